"""Convert OpenELM checkpoints into MLX model folders (see ``io.folder`` for the layout).

Sources: an ``apple/OpenELM-*`` Hugging Face repo or folder (``model.safetensors``, sharded
safetensors with an index, or ``pytorch_model.bin``), or a CoreNet ``.pt`` with its training
YAML. Tensors are read, checked, cast and optionally quantized one at a time.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelArgs
from ..model import Model
from ..tokenizer import Tokenizer
from ..utils import Progress, atomic_folder, check_destination, first_line
from ..weights import DTYPE_NAMES, DTYPES, QUANT_BITS, QUANT_GROUP_SIZES
from .folder import (
    MARKER,
    TOKENIZER_FILES,
    WeightItem,
    arch_config,
    has_tokenizer,
    read_config,
    tokenizer_sources,
    weight_files,
    write_tokenizer,
    write_weights,
)
from .hub import LLAMA_TOKENIZER_REPO, download, is_repo_id, llama_tokenizer

# Buffers some exporters save that are not parameters (RoPE frequencies, causal mask).
NON_PARAMETERS = re.compile(r"(^|\.)(inv_freq|causal_mask)$")
SAFETENSORS_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
NO_TOKENIZER = (
    "no tokenizer: the source ships none and {reason}. Accept the Llama-2 licence at "
    f"https://huggingface.co/{LLAMA_TOKENIZER_REPO} and log in (`huggingface-cli login` or HF_TOKEN), "
    "or pass a tokenizer (--tokenizer PATH: a tokenizer.model or a folder with one), or use a ready "
    "conversion that ships a tokenizer such as mlx-community/OpenELM-270M-Instruct"
)


def _local_or_download(text: str, revision: Optional[str]) -> Path:
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            hint = "; a CoreNet .pt goes with corenet= (--corenet)" if path.suffix == ".pt" else ""
            raise ValueError(f"{path} is a file; --hf takes a model folder or a hub repo id{hint}")
        return path
    if is_repo_id(text):
        return download(text, revision)
    raise FileNotFoundError(f"{text}: no such folder, and not a Hugging Face repo id (owner/name)")


# ---------------------------------------------------------------- checkpoint sources


@dataclasses.dataclass
class Source:
    """A checkpoint's tensors by HF name: shapes and dtypes up front, data read one at a time."""

    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, Any]
    read: Callable[[str], mx.array]
    kind: str


def _hf_name(name: str) -> str:
    name = name.removeprefix("module.")
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def safetensors_source(files: Sequence[Path]) -> Source:
    from safetensors import SafetensorError, safe_open

    shapes, dtypes, where = {}, {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as handle:
                for key in handle.keys():
                    s = handle.get_slice(key)
                    name = _hf_name(key)
                    if name in where:
                        raise ValueError(f"tensor {key} appears in both {where[name][0].name} and {f.name}")
                    shapes[name] = tuple(s.get_shape())
                    dtypes[name] = SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype())
                    where[name] = (f, key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f.name} is truncated or corrupt ({first_line(e)}); download it again") from None
    opened: Dict[Path, Dict[str, mx.array]] = {}

    def read(name: str) -> mx.array:
        f, key = where[name]
        if f not in opened:
            opened[f] = mx.load(str(f))  # lazy: a tensor's bytes are read when it is evaluated
        return opened[f].pop(key)

    return Source(shapes, dtypes, read, "safetensors")


def _import_torch(what: Path):
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {what.name} needs PyTorch: pip install 'mlx-openelm[torch]'") from None
    return torch


def _unwrap_state_dict(obj):
    """Training checkpoints nest the weights (``{"model_state_dict": {...}}``)."""
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def torch_source(files: Sequence[Path], kind: str) -> Source:
    torch = _import_torch(files[0])
    state = {}
    for f in files:
        try:
            try:
                loaded = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                loaded = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch errors alike
            raise ValueError(f"cannot read {f.name} ({first_line(e)}); is it a complete PyTorch state dict?") from None
        loaded = _unwrap_state_dict(loaded)
        if not isinstance(loaded, dict):
            raise ValueError(f"{f.name} holds a {type(loaded).__name__}, not a state dict")
        state.update({_hf_name(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    return tensors_source(torch, state, kind)


def tensors_source(torch, state: Dict[str, Any], kind: str) -> Source:
    """A ``Source`` over torch tensors by HF name; each is converted (and released) when read."""
    to_mx = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}

    def read(name: str) -> mx.array:
        t = state.pop(name).detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            return mx.array(t.float().numpy()).astype(mx.bfloat16)
        return mx.array(t.numpy())

    return Source({k: tuple(v.shape) for k, v in state.items()}, {k: to_mx.get(v.dtype, v.dtype) for k, v in state.items()}, read, kind)


def open_hf(folder: Path) -> Tuple[ModelArgs, Source]:
    """Architecture and tensors of an HF (or MLX float) OpenELM folder."""
    config = read_config(folder)
    if "quantization" in config:
        raise ValueError(f"{folder} is already a quantized MLX model; load it directly instead of converting it")
    try:
        args = ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder}/config.json: {first_line(e)}") from None
    files = weight_files(folder)
    if files:
        return args, safetensors_source(files)
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        bins = [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no model weights (model.safetensors or pytorch_model.bin) in {folder}")
    return args, torch_source(bins, "pytorch")


# CoreNet's general_gpt block of each published OpenELM pretraining YAML
# (apple/corenet projects/openelm/pretraining_configs/openelm_{size}.yaml): the model name picks
# the architecture; the vocabulary is padded to 32128 rows with padding index 32000.
CORENET_GENERAL_GPT = {
    size: {"model_name": f"OpenELM-{size}", "vocab_size": 32128, "max_context_length": 2048, "padding_index": 32000}
    for size in ("270M", "450M", "1_1B", "3B")
}
# wrappers a checkpoint file may put around the model's state dict, tried in this order
CORENET_WRAPPERS = ("model_state_dict", "state_dict", "model")
# CoreNet's rotary-embedding buffers are recomputed, never parameters
CORENET_BUFFERS = re.compile(r"(^|\.)pos_embedding\.")
KEY_PREFIXES = ("module.", "_orig_mod.", "model.")


def _corenet_state(obj, name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The model's state dict inside a loaded CoreNet ``.pt`` and what was found around it.

    Model-weight checkpoints (``checkpoint_epoch_0_iter_*.pt``, ``checkpoint_average.pt``) are the
    bare state dict. Training checkpoints (``training_checkpoint_*.pt``) hold ``model_state_dict``
    next to ``optim_state_dict``, ``iterations``, ``epoch`` ...: only the model part is taken."""
    info: Dict[str, Any] = {"corenet_checkpoint": "model weights"}
    for _ in range(3):  # {"model": {"state_dict": {...}}} and the like
        if not isinstance(obj, dict):
            break
        key = next((k for k in CORENET_WRAPPERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        others = sorted(str(k) for k in obj if k != key)
        if "optim_state_dict" in obj or "optimizer" in obj:
            info["corenet_checkpoint"] = f"training checkpoint: {key} taken; {', '.join(others)} ignored (never read)"
        for k in ("iterations", "epoch"):
            if isinstance(obj.get(k), int):
                info[f"corenet_{k}"] = obj[k]
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{name} holds a {type(obj).__name__}, not a CoreNet state dict")
    state = {}
    for k, v in obj.items():
        if not hasattr(v, "shape") or CORENET_BUFFERS.search(k):
            continue
        while k.startswith(KEY_PREFIXES):  # DDP / torch.compile / wrapper prefixes
            k = k.split(".", 1)[1]
        if k.startswith("classifier."):  # CoreNet's untied output layer
            k = "lm_head." + k.split(".", 1)[1]
        state[_hf_name(k)] = v
    if "transformer.token_embeddings.weight" not in state:
        raise ValueError(f"{name} has no token_embeddings.weight; it is not an OpenELM (CoreNet general_gpt) checkpoint")
    return state, info


def corenet_source(ckpt: Path) -> Tuple[Source, Dict[str, Any]]:
    """Tensors of a CoreNet ``.pt``, memory-mapped (read one at a time while writing), and what
    kind of checkpoint it is (see ``_corenet_state``)."""
    torch = _import_torch(ckpt)
    try:
        loaded = torch.load(str(ckpt), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # the legacy (non-zip) format cannot be memory-mapped
            raise ValueError(f"cannot read {ckpt.name} ({first_line(e)}); is it a complete CoreNet checkpoint?") from e
        try:
            loaded = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        except Exception as e2:
            raise ValueError(f"cannot read {ckpt.name} ({first_line(e2)}); is it a complete CoreNet checkpoint?") from e2
    except Exception as e:  # pickle, zip and torch errors alike
        raise ValueError(f"cannot read {ckpt.name} ({first_line(e)}); is it a complete CoreNet checkpoint?") from e
    state, info = _corenet_state(loaded, ckpt.name)
    del loaded  # the optimizer state of a training checkpoint is never touched (memory-mapped)
    return tensors_source(torch, state, "corenet"), info


def corenet_args_from_shapes(shapes: Dict[str, Tuple[int, ...]]) -> Tuple[ModelArgs, Optional[str]]:
    """The architecture of a CoreNet OpenELM checkpoint read from its tensor shapes, and the
    published size it is (``"270M"``, ``"450M"``, ``"1_1B"``, ``"3B"``) or None.

    A published size gets its shipped general_gpt block (``CORENET_GENERAL_GPT``); any other
    shape gets the per-layer head counts and FFN widths the tensors imply (rotary and norm
    settings at OpenELM's values)."""
    from ..config import PRESETS

    vocab, dim = shapes["transformer.token_embeddings.weight"]
    layers = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"transformer\.layers\.(\d+)\.", k))})
    n = len(layers)
    if layers != list(range(n)) or n == 0:
        raise ValueError(f"the checkpoint's layers are {layers[:5]}...; expected layers.0 .. layers.N-1")
    for size, block in CORENET_GENERAL_GPT.items():
        preset = PRESETS[size]
        if preset["num_transformer_layers"] == n and preset["model_dim"] == dim:
            return ModelArgs.from_name(size, vocab_size=vocab, max_context_length=block["max_context_length"]), size
    try:
        head_dim = shapes["transformer.layers.0.attn.q_norm.weight"][0]
        q_heads = [shapes[f"transformer.layers.{i}.attn.out_proj.weight"][1] // head_dim for i in range(n)]
        kv_heads = [(shapes[f"transformer.layers.{i}.attn.qkv_proj.weight"][0] // head_dim - q) // 2 for i, q in enumerate(q_heads)]
        ffn = [shapes[f"transformer.layers.{i}.ffn.proj_2.weight"][1] for i in range(n)]
    except KeyError as e:
        raise ValueError(f"cannot infer the architecture: the checkpoint has no {e.args[0]}; give its CoreNet training YAML (corenet_config)") from None
    args = ModelArgs(
        num_transformer_layers=n, model_dim=dim, head_dim=head_dim, vocab_size=vocab,
        num_gqa_groups=max(1, q_heads[0] // max(1, kv_heads[0])), num_query_heads=q_heads, num_kv_heads=kv_heads,
        ffn_intermediate_sizes=ffn, share_input_output_layers="transformer.lm_head.weight" not in shapes,
    )
    return args, None


def _corenet_yaml_args(yaml_path: Path) -> Tuple[ModelArgs, Dict[str, Any]]:
    """Architecture from the YAML's ``model.language_modeling.general_gpt`` block (``model_name``
    picks a preset, explicit keys override it)."""
    import yaml

    if not yaml_path.is_file():
        raise FileNotFoundError(f"{yaml_path}: no such file")
    try:
        block = yaml.safe_load(yaml_path.read_text())["model"]["language_modeling"]["general_gpt"]
    except yaml.YAMLError as e:
        raise ValueError(f"{yaml_path} is not valid YAML ({first_line(e)})") from None
    except (KeyError, TypeError):
        raise ValueError(f"{yaml_path} has no model.language_modeling.general_gpt block; give the checkpoint's CoreNet training YAML") from None
    block = dict(block)
    padding_index = block.pop("padding_index", None)
    model_name = block.pop("model_name", None)
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    try:
        if model_name:
            args = ModelArgs.from_name(model_name, **{k: v for k, v in block.items() if k in fields})
        else:
            args = ModelArgs.from_dict(block)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{yaml_path}: {first_line(e)}") from None
    return args, {"padding_index": padding_index, "model_name": model_name, "corenet_config": str(yaml_path)}


def open_corenet(ckpt: Path, yaml_path: Optional[Path] = None) -> Tuple[ModelArgs, Source, Dict[str, Any], str]:
    """Architecture and tensors of a CoreNet OpenELM checkpoint (the published
    ``checkpoint_epoch_0_iter_*.pt``, ``checkpoint_average.pt`` or a ``training_checkpoint_*.pt``,
    of which only the model part is read). The architecture comes from ``yaml_path`` (the
    training YAML) when given, else from the tensor shapes (``corenet_args_from_shapes``)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such file")
    source, info = corenet_source(ckpt)
    if yaml_path is not None:
        args, found = _corenet_yaml_args(Path(yaml_path))
        model_name = found.pop("model_name")
        info.update(found)
    else:
        args, size = corenet_args_from_shapes(source.shapes)
        model_name = f"OpenELM-{size}" if size else None
        info["corenet_config"] = f"shipped general_gpt block of {model_name}" if size else "inferred from the tensor shapes"
        info["padding_index"] = CORENET_GENERAL_GPT[size]["padding_index"] if size else None
    info["source_vocab_size"] = args.vocab_size
    name = f"{model_name}-{ckpt.stem}" if model_name else ckpt.stem
    return args, source, info, name


# ---------------------------------------------------------------- tokenizer


def resolve_tokenizer(explicit: Optional[str], source_dir: Optional[Path]) -> List[Path]:
    """Tokenizer files for the output: ``explicit`` (path or hub repo), else the source's,
    else ``tokenizer.model`` of the gated meta-llama/Llama-2-7b-hf or of its checksum-verified
    public copy (``io.hub.llama_tokenizer``)."""
    return resolve_tokenizer_source(explicit, source_dir)[0]


def resolve_tokenizer_source(explicit: Optional[str], source_dir: Optional[Path]) -> Tuple[List[Path], str]:
    """``resolve_tokenizer`` and where the files came from (a path or a hub repo id)."""
    if explicit:
        path = Path(explicit).expanduser()
        if path.exists():
            return tokenizer_sources(path), str(explicit)
        if not is_repo_id(explicit):
            raise FileNotFoundError(f"tokenizer {explicit}: no such file or folder, and not a hub repo id")
        return tokenizer_sources(download(explicit, None, TOKENIZER_FILES)), explicit
    if source_dir is not None and has_tokenizer(source_dir):
        return tokenizer_sources(source_dir), "source"
    try:
        path, repo = llama_tokenizer()
    except ValueError as e:
        raise ValueError(NO_TOKENIZER.format(reason=first_line(e))) from e
    return [path], repo


def _tokenizer_vocab(files: Sequence[Path]) -> int:
    model_files = [f for f in files if f.suffix == ".model"]
    target = model_files[0] if model_files else files[0].parent
    try:
        return Tokenizer(target).vocab_size
    except Exception as e:  # sentencepiece/tokenizers parse errors
        raise ValueError(f"cannot read the tokenizer {target} ({first_line(e)})") from None


# ---------------------------------------------------------------- conversion


def check_tensors(expected: Dict[str, Tuple[int, ...]], source: Source) -> None:
    """One-line error for the first missing, unexpected or misshaped tensor."""
    names = {k for k in source.shapes if not NON_PARAMETERS.search(k)}
    missing = [k for k in expected if k not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint is missing tensor {missing[0]} of shape {list(expected[missing[0]])}{more}")
    unexpected = sorted(names - set(expected))
    if unexpected:
        k = unexpected[0]
        raise ValueError(f"unexpected tensor {k} of shape {list(source.shapes[k])} in checkpoint; it does not belong to this OpenELM config")
    for k, shape in expected.items():
        if source.shapes[k] != shape:
            raise ValueError(f"tensor {k} has shape {list(source.shapes[k])} but the config implies {list(shape)}")
        if source.dtypes[k] not in DTYPE_NAMES:
            raise ValueError(f"tensor {k} has dtype {source.dtypes[k]}; expected float32, float16 or bfloat16 weights")


def _weight_items(
    source: Source,
    expected: Dict[str, Tuple[int, ...]],
    dtype,
    quantized: set,
    group_size: int,
    bits: int,
    vocab_size: int,
) -> List[WeightItem]:
    items = []
    for name, shape in expected.items():
        out_dtype = dtype or source.dtypes[name]
        rows = vocab_size if name.endswith(("token_embeddings.weight", "lm_head.weight")) else shape[0]
        numel = rows * (shape[1] if len(shape) > 1 else 1)
        if name in quantized:
            size = numel * bits // 8 + 2 * (numel // group_size) * out_dtype.size
        else:
            size = numel * out_dtype.size

        def make(name=name, rows=rows, out_dtype=out_dtype):
            w = source.read(name)
            if w.shape[0] != rows:  # CoreNet pads the vocabulary (32128 rows); keep the real tokens
                w = w[:rows]
            w = w.astype(out_dtype)
            if name not in quantized:
                return {name: w}
            base = name.removesuffix(".weight")
            wq, scales, biases = mx.quantize(w, group_size, bits)
            return {name: wq, f"{base}.scales": scales, f"{base}.biases": biases}

        items.append((name, size, make))
    return items


def convert(
    hf_path: Optional[str] = None,
    mlx_path: Optional[Path] = None,
    *,
    dtype: Optional[str] = "float16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    tokenizer: Optional[str] = None,
    revision: Optional[str] = None,
    corenet: Optional[Path] = None,
    corenet_config: Optional[Path] = None,
    force: bool = False,
    progress: Optional[Progress] = None,
    source_name: Optional[str] = None,
) -> Path:
    """Convert an OpenELM checkpoint into an MLX model folder and return its path.

    ``hf_path``: a hub repo id or a local folder (HF or MLX float layout); or ``corenet`` (a
    ``.pt``) with ``corenet_config`` (its training YAML). ``dtype=None`` keeps the stored dtype.
    ``quantize`` quantizes the linear layers and the embedding (affine, ``q_bits``,
    ``q_group_size``) where the input width is a multiple of the group size. ``progress`` is
    called as ``progress(tensor_name, i, n)``. Nothing is left behind on failure.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize and q_bits not in QUANT_BITS:
        raise ValueError(f"--q-bits {q_bits} is not supported; choose one of {', '.join(map(str, QUANT_BITS))}")
    if quantize and q_group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"--q-group-size {q_group_size} is not supported; choose one of {', '.join(map(str, QUANT_GROUP_SIZES))}")
    if (hf_path is None) == (corenet is None):
        raise ValueError("give either --hf REPO_OR_FOLDER or --corenet CKPT.pt (with --corenet-config YAML for an unpublished shape)")
    if mlx_path is not None:
        check_destination(Path(mlx_path), force)

    extra: Dict[str, Any] = {}
    if corenet is not None:
        args, source, extra, name = open_corenet(Path(corenet), Path(corenet_config) if corenet_config is not None else None)
        source_dir = None
    else:
        source_dir = _local_or_download(str(hf_path), revision)
        args, source = open_hf(source_dir)
        name = source_name or str(hf_path)
    name = name.rstrip("/")
    short_name = Path(name).name or "model"
    dest = Path(mlx_path) if mlx_path is not None else Path("mlx_model") / short_name
    check_destination(dest, force)
    inputs = [source_dir] if source_dir is not None else [Path(p) for p in (corenet, corenet_config) if p is not None]
    if tokenizer is not None and Path(tokenizer).expanduser().exists():
        inputs.append(Path(tokenizer).expanduser())
    check_replaceable(dest, inputs)
    out_dtype = DTYPES[dtype] if dtype else None
    if args.model_dim >= 3072 and dtype == "float16":
        warnings.warn(
            "OpenELM-3B has activations beyond float16's range; convert with --dtype bfloat16 "
            "(Apple's recommendation) to avoid inf/nan outputs",
            UserWarning,
            stacklevel=2,
        )

    model = Model(args)  # lazy: only shapes are used, no memory for weights
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_tensors(expected, source)
    quantized = set()
    if quantize:
        for path, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % q_group_size == 0:
                quantized.add(f"{path}.weight")
    del model

    tok_files, tok_origin = resolve_tokenizer_source(tokenizer, source_dir)
    tok_vocab = _tokenizer_vocab(tok_files)
    if tok_vocab > args.vocab_size:
        raise ValueError(f"the tokenizer has {tok_vocab} tokens but the model only {args.vocab_size}; is --tokenizer the right one?")
    out_args = args
    if source.kind == "corenet" and tok_vocab < args.vocab_size:
        # rows from the padding index on are CoreNet's padding, never real tokens
        out_args = dataclasses.replace(args, vocab_size=tok_vocab)
    items = _weight_items(source, expected, out_dtype, quantized, q_group_size, q_bits, out_args.vocab_size)

    stored = out_dtype or source.dtypes.get("transformer.token_embeddings.weight", mx.float32)
    config = {**arch_config(out_args), "dtype": DTYPE_NAMES[stored]}
    if quantize:
        config["quantization"] = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
    from .. import __version__

    config[MARKER] = {"version": __version__, "source": name, "source_format": source.kind}
    if revision:
        config[MARKER]["revision"] = revision
    config[MARKER]["tokenizer"] = tok_origin
    config[MARKER].update({k: v for k, v in extra.items() if v is not None})

    try:
        with atomic_folder(dest, force) as tmp:
            write_weights(tmp, items, progress)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            write_tokenizer(tmp, tok_files, "Instruct" in short_name, out_args.max_context_length)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on the disk of {dest.absolute().parent} while writing the converted "
                          "model (nothing was kept); free some space or choose another output folder") from e
        raise
    return dest


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_replaceable(dest: Path, inputs: Sequence[Path] = ()) -> None:
    """Refuse a destination that holds (or is) one of ``inputs`` or the working folder, and an
    existing non-empty folder that no conversion wrote (no ``config.json`` with our marker):
    replacing may only ever delete a previous conversion."""
    target = Path(dest).expanduser().resolve()
    for p in inputs:
        p = Path(p).expanduser().resolve()
        if _inside(p, target):
            raise ValueError(f"the output folder {dest} holds the input {p}; converting into it would delete the source; choose another output path")
    if _inside(Path.cwd().resolve(), target):
        raise ValueError(f"the output folder {dest} is the working folder or one of its parents; choose a new subfolder")
    if target.is_dir() and any(target.iterdir()):
        try:
            config = json.loads((target / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        if not (isinstance(config, dict) and MARKER in config):
            raise ValueError(f"{dest} exists and was not written by a conversion (no config.json with the {MARKER!r} "
                             "marker); replacing it would delete files that are not ours; choose another output path")
