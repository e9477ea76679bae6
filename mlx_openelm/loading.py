"""Find, load and save OpenELM model folders.

An MLX model folder holds ``config.json`` (our ``ModelArgs`` fields plus ``quantization``
and ``dtype``), ``model.safetensors`` (or 2 GB shards with ``model.safetensors.index.json``)
whose names are the Hugging Face ones (``transformer.layers.N.attn.qkv_proj.weight``),
and the tokenizer. mlx-lm's ``load`` reads the same folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs

MARKER = "mlx_openelm"  # config.json key written by our converter (provenance)
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)

# One output tensor group: (name used for progress, its size in bytes, a function that makes it).
WeightItem = Tuple[str, int, Callable[[], Dict[str, mx.array]]]
Progress = Callable[[str, int, int], None]


def cache_dir() -> Path:
    """Where hub models and local HF folders are converted on first use (env MLX_OPENELM_CACHE)."""
    return Path(os.environ.get("MLX_OPENELM_CACHE") or Path.home() / ".cache" / "mlx-openelm").expanduser()


# ---------------------------------------------------------------- reading folders


def read_config(folder: Path) -> Dict[str, Any]:
    """``config.json`` of an OpenELM folder; one-line errors when missing or not OpenELM."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give an OpenELM model folder or hub id")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    model_type = config.get("model_type")
    if model_type != "openelm":
        raise ValueError(f"{path} has model_type {model_type!r}; only OpenELM ('openelm') models are supported")
    return config


def weight_files(folder: Path) -> List[Path]:
    """The safetensors files of a folder: those its index names, else every ``*.safetensors``."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid weight index ({e})") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f.name} is listed in {index.name} but missing from {folder}")
        return files
    return sorted(folder.glob("*.safetensors"))


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))


def is_ready(folder: Path) -> bool:
    """True when ``load_model`` can use the folder as is: OpenELM config, safetensors, a tokenizer."""
    folder = Path(folder)
    try:
        read_config(folder)
        return has_tokenizer(folder) and bool(weight_files(folder))
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- writing folders


def check_destination(dest: Path, force: bool) -> None:
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder; choose another output path")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ValueError(f"{dest} already exists and is not empty; pass --force to replace it or choose another path")


@contextmanager
def atomic_folder(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; rename it to ``dest`` only if the block succeeds.

    On any failure the temporary folder (and parent folders created for it) are removed,
    so nothing half-written is left behind.
    """
    dest = Path(dest).absolute()
    check_destination(dest, force)
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
        raise


def plan_shards(sizes: Sequence[int], max_bytes: int = MAX_SHARD_BYTES) -> List[List[int]]:
    """Group consecutive items into shards of at most ``max_bytes`` (an oversized item stands alone)."""
    shards: List[List[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not shards or (total + size > max_bytes and shards[-1]):
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


def write_weights(
    folder: Path,
    items: Sequence[WeightItem],
    progress: Optional[Progress] = None,
    max_shard_bytes: Optional[int] = None,
    file_format: str = "mlx",
) -> List[str]:
    """Make and write the tensors one item at a time, at most one shard held in memory.

    One shard is written as ``model.safetensors``; more as ``model-0000i-of-0000N.safetensors``
    plus ``model.safetensors.index.json``. Returns the file names written.
    """
    folder = Path(folder)
    shards = plan_shards([size for _, size, _ in items], max_shard_bytes or MAX_SHARD_BYTES)
    n = len(shards)
    weight_map: Dict[str, str] = {}
    total_size = 0
    done = 0
    files = []
    for j, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        tensors: Dict[str, mx.array] = {}
        for i in shard:
            label, _, make = items[i]
            out = make()
            mx.eval(out)
            tensors.update(out)
            done += 1
            if progress is not None:
                progress(label, done, len(items))
        for k, v in tensors.items():
            weight_map[k] = name
            total_size += v.nbytes
        mx.save_safetensors(str(folder / name), tensors, metadata={"format": file_format})
        files.append(name)
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def arch_config(args: ModelArgs) -> Dict[str, Any]:
    """``ModelArgs`` as config.json keys, with ``ffn_multipliers`` one per layer (size / model_dim)
    so readers that derive FFN sizes from it (mlx-lm, HF) get the exact sizes."""
    config = args.to_dict()
    config["ffn_multipliers"] = [size / args.model_dim for size in args.ffn_intermediate_sizes]
    return config


def quantization_of(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"group_size", "bits", "mode"}`` of the model's quantized layers, or None."""
    for _, m in model.named_modules():
        if isinstance(m, QUANTIZED):
            return {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
    return None


def float_dtype_of(model: nn.Module) -> str:
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return DTYPE_NAMES.get(p.dtype, str(p.dtype))
    return "float32"


def write_tokenizer(folder: Path, sources: Sequence[Path], instruct: bool, max_length: int) -> None:
    """Copy tokenizer files and write a ``tokenizer_config.json`` (Llama tokenizer fields, plus the
    chat template for -Instruct models) so both our ``Tokenizer`` and transformers can read it."""
    from .tokenizer import CHAT_TEMPLATE

    folder = Path(folder)
    tok_config: Dict[str, Any] = {}
    for src in sources:
        src = Path(src)
        if src.name == "tokenizer_config.json":
            tok_config = json.loads(src.read_text())
            continue
        target = "tokenizer.model" if src.suffix == ".model" else src.name
        shutil.copyfile(src, folder / target)
    defaults = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": max_length,
    }
    for k, v in defaults.items():
        tok_config.setdefault(k, v)
    if instruct:
        tok_config.setdefault("chat_template", CHAT_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def tokenizer_sources(src: Union[str, Path]) -> List[Path]:
    """The tokenizer files to copy from a folder or a ``tokenizer.model`` file."""
    src = Path(src)
    if src.is_file():
        if src.suffix != ".model" and src.name != "tokenizer.json":
            raise ValueError(f"{src} is not a tokenizer: give a SentencePiece tokenizer.model, a tokenizer.json or a folder")
        return [src]
    files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not any(f.name in ("tokenizer.model", "tokenizer.json") for f in files):
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {src}")
    return files


def _model_items(model: nn.Module, dtype=None) -> List[WeightItem]:
    def item(name, value):
        return (name, value.nbytes, lambda: {name: value if dtype is None else value.astype(dtype)})

    return [item(k, v) for k, v in tree_flatten(model.parameters())]


def save_model(folder: Path, model: nn.Module, config: Dict[str, Any], tokenizer_src, *, force: bool = False) -> Path:
    """Write ``model`` as an MLX model folder, atomically (used by convert and fuse).

    ``config`` is the extra config.json content (e.g. provenance); architecture keys,
    ``quantization`` and ``dtype`` are taken from the model itself.
    """
    quant = quantization_of(model)
    out = {**config, **arch_config(model.args), "dtype": float_dtype_of(model)}
    out.pop("quantization", None)
    if quant:
        out["quantization"] = quant
    instruct = "Instruct" in str(out.get(MARKER, {}).get("source", ""))
    with atomic_folder(folder, force) as tmp:
        write_weights(tmp, _model_items(model))
        (tmp / "config.json").write_text(json.dumps(out, indent=2))
        write_tokenizer(tmp, tokenizer_sources(tokenizer_src), instruct, model.args.max_context_length)
    return Path(folder)


def hf_config(args: ModelArgs, dtype: str) -> Dict[str, Any]:
    """config.json in the apple/OpenELM form (remote-code fields, per-layer lists)."""
    config = arch_config(args)
    for key in ("ffn_intermediate_sizes", "rms_norm_eps"):
        config.pop(key)
    config.update(
        architectures=["OpenELMForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
        },
        initializer_range=0.02,
        torch_dtype=dtype,
        transformers_version="4.39.3",
        use_cache=True,
    )
    return dict(sorted(config.items()))


def export_hf(folder: Path, model: nn.Module, args: ModelArgs, *, tokenizer_src=None, force: bool = False) -> Path:
    """Write the apple/OpenELM (Hugging Face) layout: float weights with ``transformer.*`` names and
    an HF config.json; quantized layers are written dequantized (``model`` itself is unchanged)."""
    dtype = float_dtype_of(model)
    with atomic_folder(folder, force) as tmp:
        write_weights(tmp, _float_items(model), file_format="pt")  # the format transformers expects
        (tmp / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2))
        if tokenizer_src is not None:
            for src in tokenizer_sources(tokenizer_src):
                shutil.copyfile(src, tmp / ("tokenizer.model" if src.suffix == ".model" else src.name))
    return Path(folder)


# ---------------------------------------------------------------- loading


def _dequantized_weight(m: nn.Module, dtype=None) -> mx.array:
    # in the target dtype: float32 represents every quantized value scale*q+bias exactly
    dt = dtype or m.scales.dtype
    biases = None if m.get("biases") is None else m.biases.astype(dt)
    return mx.dequantize(m.weight, m.scales.astype(dt), biases, m.group_size, m.bits, mode=m.mode)


def _float_items(model: nn.Module) -> List[WeightItem]:
    """The model's tensors with quantized layers dequantized one at a time (the model is unchanged)."""
    quantized = {p: m for p, m in model.named_modules() if isinstance(m, QUANTIZED)}
    items: List[WeightItem] = []
    for name, value in tree_flatten(model.parameters()):
        path, _, leaf = name.rpartition(".")
        m = quantized.get(path)
        if m is None:
            items.append((name, value.nbytes, lambda name=name, value=value: {name: value}))
        elif leaf == "weight":
            size = value.size * 32 // m.bits * m.scales.dtype.size
            items.append((name, size, lambda name=name, m=m: {name: _dequantized_weight(m)}))
    return items


def dequantize(model: nn.Module, dtype=None) -> nn.Module:
    """Replace quantized layers by float ones (in the scales' dtype unless ``dtype``), in place."""
    new = []
    for path, m in model.named_modules():
        if not isinstance(m, QUANTIZED):
            continue
        w = _dequantized_weight(m, dtype)
        mx.eval(w)
        if isinstance(m, nn.QuantizedLinear):
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                layer.bias = m.bias
        else:
            layer = nn.Embedding(w.shape[0], w.shape[1])
        layer.weight = w
        new.append((path, layer))
    if new:
        model.update_modules(tree_unflatten(new))
    return model


def cast_parameters(model: nn.Module, dtype) -> nn.Module:
    """Cast float parameters one at a time, so old and new copies never coexist whole."""
    names = [k for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype]
    for k in names:
        new = dict(tree_flatten(model.parameters()))[k].astype(dtype)
        mx.eval(new)
        model.update(tree_unflatten([(k, new)]))
    return model


def _device_is_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def load_model(folder: Path, dtype: Optional[str] = "auto", keep_quantized: bool = False):
    """Load an MLX model folder.

    ``dtype="auto"``: on the CPU compute in float32 (fp16/bf16 weights upcast, quantized layers
    dequantized, as MLX's CPU quantized matmul is far slower than float32 BLAS) unless
    ``keep_quantized``; on a GPU keep the stored dtype and quantization. An explicit dtype
    casts every float parameter; ``dtype=None`` keeps the stored dtype and quantization on any
    device (for rewriting a model, e.g. fuse). ``model.compute_info`` records the choice.
    """
    from . import _backend
    from .model import Model

    if dtype is not None and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    folder = Path(folder)
    config = read_config(folder)
    args = ModelArgs.from_dict(config)
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    weights: Dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{f} is truncated or corrupt ({_first_line(e)}); convert or download it again") from None

    model = Model(args)
    quant = config.get("quantization")
    if quant or any(k.endswith(".scales") for k in weights):
        quant = quant or {}

        def stored_quantized(path, module):  # as written, with mlx-lm's per-layer overrides
            if f"{path}.scales" not in weights:
                return False
            return quant[path] if isinstance(quant.get(path), dict) else True

        nn.quantize(
            model,
            group_size=quant.get("group_size", 64),
            bits=quant.get("bits", 4),
            mode=quant.get("mode", "affine"),
            class_predicate=stored_quantized,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"weights in {folder} do not match its config.json: {_first_line(e)}") from None
    del weights
    stored_quant = quantization_of(model)
    stored_dtype = float_dtype_of(model)

    cpu = _device_is_cpu()
    target = DTYPES["float32"] if (dtype == "auto" and cpu) else DTYPES.get(dtype)
    if stored_quant and cpu and not keep_quantized and dtype is not None:
        dequantize(model, target)
    if target is not None:
        cast_parameters(model, target)
    mx.eval(model.parameters())
    quant_now = quantization_of(model)
    info = {
        "device": "cpu" if cpu else "gpu",
        "dtype": float_dtype_of(model),
        "stored_dtype": stored_dtype,
        "quantized": quant_now,
        "stored_quantization": stored_quant,
        "blas": _backend.BLAS,
    }
    object.__setattr__(model, "compute_info", info)  # plain attribute, not part of the module tree
    object.__setattr__(model, "folder", folder)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _local_cache_name(folder: Path) -> str:
    folder = folder.resolve()
    stamp = [str(folder)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir()) if f.is_file()]
    return f"local--{folder.name}--{hashlib.sha1(chr(0).join(stamp).encode()).hexdigest()[:12]}"


def resolve_model_path(path_or_repo: Union[str, Path], revision: Optional[str] = None, *, tokenizer=None) -> Path:
    """A ready-to-load MLX folder for a local folder or a Hugging Face repo id.

    A folder (or hub snapshot, e.g. an mlx-community conversion) with OpenELM config,
    safetensors weights and a tokenizer is used as is. Otherwise (apple/OpenELM-* repos
    ship no tokenizer; some have only pytorch_model.bin) it is converted once, keeping its
    dtype, into ``cache_dir()/<owner>--<name>--<commit>`` and that folder is returned.
    ``tokenizer`` is passed to the converter (path or hub repo of a tokenizer).
    """
    from .convert import convert, download, is_repo_id

    text = str(path_or_repo)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{local} is a file; give a model folder or a hub id")
        if is_ready(local):
            return local
        target = cache_dir() / _local_cache_name(local)
    elif is_repo_id(text):
        local = download(text, revision)
        if is_ready(local):
            return local
        commit = local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else (revision or "main")
        target = cache_dir() / f"{text.replace('/', '--')}--{commit[:12]}"
    else:
        raise FileNotFoundError(f"{text}: no such folder, and not a Hugging Face repo id (owner/name)")
    if "quantization" in read_config(local) and not has_tokenizer(local):  # nothing to convert, just incomplete
        raise FileNotFoundError(f"{local} has no tokenizer.model or tokenizer.json; copy the model's tokenizer into it")
    if is_ready(target):
        return target
    return convert(str(local), target, dtype=None, tokenizer=tokenizer, force=True, source_name=text)


def load(
    path_or_repo: Union[str, Path],
    *,
    dtype: str = "auto",
    adapter_path: Optional[Union[str, Path]] = None,
    revision: Optional[str] = None,
    keep_quantized: bool = False,
    tokenizer: Optional[str] = None,
):
    """``(model, tokenizer)`` for a local folder or hub id (see ``resolve_model_path``, ``load_model``);
    ``adapter_path`` applies a LoRA/DoRA adapter folder."""
    from .tokenizer import Tokenizer, load_chat_template

    folder = resolve_model_path(path_or_repo, revision, tokenizer=tokenizer)
    model = load_model(folder, dtype=dtype, keep_quantized=keep_quantized)
    if adapter_path is not None:
        from mlx_openelm.lora.adapters import load_adapters

        load_adapters(model, adapter_path)  # in place
    return model, Tokenizer(folder, chat_template=load_chat_template(folder))
