"""Resolve a model (folder, hub id), convert it once into the cache when needed, and load it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..config import ModelArgs
from ..model import Model
from ..utils import first_line
from ..weights import apply_plan, check_dtype, compute_plan, dtype_label, float_dtype_of, quantization_of
from .folder import has_tokenizer, is_ready, read_config, weight_files
from .hub import cache_dir, download, is_repo_id


def load_model(folder: Path, dtype: Optional[str] = "auto", keep_quantized: bool = False):
    """Load an MLX model folder.

    ``dtype="auto"``: on the CPU compute in float32 (fp16/bf16 weights upcast, quantized layers
    dequantized, as MLX's CPU quantized matmul is far slower than float32 BLAS) unless
    ``keep_quantized``; on a GPU keep the stored dtype and quantization. An explicit dtype
    casts every float parameter; ``dtype=None`` keeps the stored dtype and quantization on any
    device (for rewriting a model, e.g. fuse). ``model.compute_info`` records the choice.
    """
    from .. import _backend

    check_dtype(dtype)
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
            raise ValueError(f"{f} is truncated or corrupt ({first_line(e)}); convert or download it again") from None

    model = Model(args)
    quant = config.get("quantization")
    if quant or any(k.endswith(".scales") for k in weights):
        quant = quant or {}

        def stored_quantized(path, module):  # as written, with mlx-lm's per-layer overrides
            if f"{path}.scales" not in weights:  # noqa: F821  (used before the del below)
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
        raise ValueError(f"weights in {folder} do not match its config.json: {first_line(e)}") from None
    del weights
    stored_quant = quantization_of(model)
    stored_dtype = float_dtype_of(model)

    plan = compute_plan(dtype, stored_quant, keep_quantized, stored_dtype=stored_dtype)
    apply_plan(model, plan)
    quant_now = quantization_of(model)
    info = {
        "device": plan.device,
        "dtype": dtype_label(model),
        "stored_dtype": stored_dtype,
        "quantized": quant_now,
        "stored_quantization": stored_quant,
        "blas": _backend.BLAS,
        "kernels": kernels.describe(),
    }
    model.eval()  # inference mode (no adapter dropout); training switches to train mode itself
    object.__setattr__(model, "compute_info", info)  # plain attribute, not part of the module tree
    object.__setattr__(model, "folder", folder)
    return model


def _local_cache_name(folder: Path) -> str:
    folder = folder.resolve()
    stamp = [str(folder)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir()) if f.is_file()]
    return f"local--{folder.name}--{hashlib.sha1(chr(0).join(stamp).encode()).hexdigest()[:12]}"


def _local_file_cache_name(path: Path) -> str:
    path = path.resolve()
    st = path.stat()
    stamp = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    return f"corenet--{path.parent.name}--{path.stem}--{hashlib.sha1(stamp.encode()).hexdigest()[:12]}"


def resolve_model_path(path_or_repo: Union[str, Path], revision: Optional[str] = None, *, tokenizer=None) -> Path:
    """A ready-to-load MLX folder for a local folder, a CoreNet ``.pt`` or a Hugging Face repo id.

    A folder (or hub snapshot, e.g. an mlx-community conversion) with OpenELM config,
    safetensors weights and a tokenizer is used as is. Otherwise (apple/OpenELM-* repos
    ship no tokenizer; some have only pytorch_model.bin) it is converted once, keeping its
    dtype, into ``cache_dir()/<owner>--<name>--<commit>`` and that folder is returned.
    A CoreNet ``.pt`` (Apple's published OpenELM checkpoints) is converted once, keeping its
    dtype, into ``cache_dir()/corenet--<folder>--<stem>--<hash>``.
    ``tokenizer`` is passed to the converter (path or hub repo of a tokenizer).
    """
    from .convert import convert

    text = str(path_or_repo)
    local = Path(text).expanduser()
    if local.is_file() and local.suffix == ".pt":  # a CoreNet checkpoint (e.g. Apple's intermediate ones)
        target = cache_dir() / _local_file_cache_name(local)
        if is_ready(target):
            return target
        return convert(corenet=local, mlx_path=target, dtype=None, tokenizer=tokenizer, force=True)
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{local} is a file; give a model folder, a CoreNet .pt checkpoint or a hub id")
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
    ``adapter_path`` applies a LoRA/DoRA adapter folder. ``tokenizer`` (a ``tokenizer.model``, a
    folder with one, or a hub repo) is used when the model is converted and, for a folder that
    ships its own, replaces it. The model is in eval mode (no dropout): training sets train mode."""
    from ..adapters import load_adapters
    from ..tokenizer import Tokenizer, load_chat_template

    folder = resolve_model_path(path_or_repo, revision, tokenizer=tokenizer)
    model = load_model(folder, dtype=dtype, keep_quantized=keep_quantized)
    if adapter_path is not None:
        load_adapters(model, adapter_path)  # in place
    model.eval()
    tok_source = folder
    if tokenizer is not None:
        from .convert import resolve_tokenizer

        files = resolve_tokenizer(tokenizer, None)
        model_files = [f for f in files if f.suffix == ".model"]
        tok_source = model_files[0] if model_files else files[0].parent
    tok = Tokenizer(tok_source, chat_template=load_chat_template(folder))
    if tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer {tok_source} has {tok.vocab_size} tokens but the model only {model.args.vocab_size}; "
                         "is tokenizer the right one?")
    return model, tok
