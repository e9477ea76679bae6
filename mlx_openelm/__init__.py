"""Run, fine-tune and study Apple's OpenELM models with MLX."""

from ._backend import defer_mlx_lm_init, preload_openblas

preload_openblas()  # must run before anything imports mlx.core
defer_mlx_lm_init()  # mlx-lm's submodules without its eager __init__ (transformers, torch: ~3 s)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-openelm")
    except PackageNotFoundError:  # a plain source checkout (PYTHONPATH=.)
        return "0+unknown"


__version__ = _version()

_LAZY = {
    "load": "io.load",
    "ModelArgs": "config",
    "Model": "model",
    "generate": "generate.stream",
    "stream_generate": "generate.stream",
    "ChatSession": "generate.chat",
    "SamplingConfig": "generate.sampling",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = list(_LAZY)
