"""The MLX model folder format: read it, write it (atomically), and the apple/OpenELM HF layout.

An MLX model folder holds ``config.json`` (our ``ModelArgs`` fields plus ``quantization``
and ``dtype``), ``model.safetensors`` (or 2 GB shards with ``model.safetensors.index.json``)
whose names are the Hugging Face ones (``transformer.layers.N.attn.qkv_proj.weight``),
and the tokenizer. mlx-lm's ``load`` reads the same folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelArgs
from ..tokenizer import CHAT_TEMPLATE
from ..utils import Progress, atomic_folder
from ..weights import QUANTIZED, dequantized_weight, float_dtype_of, quantization_of

MARKER = "mlx_openelm"  # config.json key written by our converter (provenance)
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# One output tensor group: (name used for progress, its size in bytes, a function that makes it).
WeightItem = Tuple[str, int, Callable[[], Dict[str, mx.array]]]


# ---------------------------------------------------------------- reading folders


def read_config(folder: Path) -> Dict[str, Any]:
    """``config.json`` of an OpenELM folder; one-line errors when missing or not OpenELM."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give an OpenELM model folder or hub id")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of config fields; give an OpenELM config.json")
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


def write_tokenizer(folder: Path, sources: Sequence[Path], instruct: bool, max_length: int) -> None:
    """Copy tokenizer files and write a ``tokenizer_config.json`` (Llama tokenizer fields, plus the
    chat template for -Instruct models) so both our ``Tokenizer`` and transformers can read it."""
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
            items.append((name, size, lambda name=name, m=m: {name: dequantized_weight(m)}))
    return items
