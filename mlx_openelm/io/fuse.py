"""Fold trained LoRA / DoRA adapters into the base weights and save the result as a standalone model.

The base is loaded in its stored format (dtype and quantization kept, on any device), so a
float16 base gives a float16 model and a 4-bit base a 4-bit one (re-quantized with the base's
bits and group size) unless ``dequantize``. ``export_hf`` writes the apple/OpenELM layout
(float weights, ``transformer.*`` names, HF config.json) for PyTorch tools instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import mlx.nn as nn

from ..adapters import ADAPTERS_FILE, CONFIG_FILE, fuse_adapters, load_adapters
from ..utils import check_destination
from ..weights import dequantize as dequantize_layers
from .folder import MARKER, read_config, save_model
from .folder import export_hf as write_hf_folder
from .load import load_model, resolve_model_path

PathLike = Union[str, Path]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_paths(save_path: Path, inputs) -> None:
    save = save_path.resolve()
    for what, folder in inputs:
        if not Path(folder).exists():  # a hub id
            continue
        folder = Path(folder).resolve()
        if _inside(folder, save):
            raise ValueError(f"--save-path {save_path} would replace the {what} folder {folder}; choose another path")


def _quantization_settings(model: nn.Module) -> set:
    return {(m.group_size, m.bits, m.mode) for _, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def fuse(
    model_path: PathLike,
    adapter_path: PathLike,
    save_path: PathLike,
    *,
    dequantize: bool = False,
    export_hf: bool = False,
    force: bool = False,
) -> Path:
    """Merge the adapters of ``adapter_path`` into the model ``model_path`` (MLX folder,
    apple/OpenELM folder or hub id) and write the fused model to ``save_path``; returns it.

    The output is an MLX model folder in the base's dtype and quantization (quantization
    dropped when ``dequantize``), with the base's tokenizer; or, with ``export_hf``, the
    apple/OpenELM layout with float weights (quantized bases are dequantized). An existing
    non-empty ``save_path`` is replaced only with ``force``; nothing is written on failure.
    """
    save_path, adapter_path = Path(save_path), Path(adapter_path)
    check_destination(save_path, force)
    for name in (CONFIG_FILE, ADAPTERS_FILE):
        if not (adapter_path / name).is_file():
            raise FileNotFoundError(f"{adapter_path / name} not found; --adapter-path takes a folder written by `mlx-openelm lora`")
    folder = resolve_model_path(model_path)
    _check_paths(save_path, [("model", folder), ("model", Path(model_path).expanduser()), ("adapter", adapter_path)])

    model = load_model(folder, dtype=None)  # stored dtype and quantization, also on the CPU
    adapter_config = load_adapters(model, adapter_path)
    model.eval()
    fuse_adapters(model, dequantize=dequantize or export_hf)
    if dequantize:
        dequantize_layers(model)  # the layers without adapters too (in the scales' dtype)

    if export_hf:
        return write_hf_folder(save_path, model, model.args, tokenizer_src=folder, force=force)
    if len(_quantization_settings(model)) > 1:
        # save_model records one quantization setting for the whole model
        raise ValueError(f"{model_path} mixes quantization settings per layer; fuse it with --dequantize")
    config = read_config(folder)
    config.pop("quantization_config", None)  # mlx-lm's duplicate of "quantization"; save_model writes that one
    config[MARKER] = {
        **config.get(MARKER, {}),
        "fused_adapters": {"adapter_path": str(adapter_path), **adapter_config.to_dict()},
    }
    return save_model(save_path, model, config, folder, force=force)
