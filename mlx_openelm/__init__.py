"""Run, fine-tune and study Apple's OpenELM models with MLX."""

from ._backend import preload_openblas

preload_openblas()  # must run before anything imports mlx.core

__version__ = "0.1.0"

_LAZY = {
    "load": "loading",
    "ModelArgs": "config",
    "Model": "model",
    "generate": "generation",
    "stream_generate": "generation",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = list(_LAZY)
