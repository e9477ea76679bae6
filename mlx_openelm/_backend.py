"""Pick a fast matmul on Linux CPUs before MLX loads.

The ``mlx-cpu`` wheel links the reference (netlib) BLAS. When the system has OpenBLAS,
loading it with RTLD_GLOBAL before ``mlx.core`` makes MLX's ``cblas_sgemm`` resolve to it
(9-30x faster float32 matmul). Set ``MLX_OPENELM_BLAS=reference`` to opt out.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

BLAS = "not applicable"  # what matmul library MLX's CPU backend uses, for --verbose


def _find_openblas():
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def preload_openblas() -> str:
    global BLAS
    if not sys.platform.startswith("linux"):
        BLAS = "platform default"
        return BLAS
    if os.environ.get("MLX_OPENELM_BLAS", "").lower() == "reference":
        BLAS = "reference BLAS (MLX_OPENELM_BLAS=reference)"
        return BLAS
    path = _find_openblas()
    if path is None:
        BLAS = "reference BLAS (install OpenBLAS, e.g. apt-get install libopenblas0-pthread, for ~10x faster float32)"
        return BLAS
    if "mlx.core" in sys.modules:
        BLAS = f"reference BLAS (mlx was imported before mlx_openelm, so {path} could not be used)"
        return BLAS
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        BLAS = f"reference BLAS ({path} failed to load: {e})"
        return BLAS
    BLAS = f"OpenBLAS ({path})"
    atexit.register(_drain_mlx)
    return BLAS


def _drain_mlx() -> None:
    """At interpreter exit, wait for MLX work still in flight (``mx.async_eval``, e.g. the token mlx-lm's
    ``generate_step`` computes ahead). Otherwise OpenBLAS's shutdown (run as its library unloads) races a
    stream thread still inside ``cblas_sgemm``: measured, 5 of 6 such exits hung or segfaulted."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return
    streams = [None]
    gen = sys.modules.get("mlx_lm.generate")
    if gen is not None and hasattr(gen, "generation_stream"):
        streams.append(gen.generation_stream)
    for s in streams:
        try:
            mx.synchronize(s)
        except Exception:  # noqa: BLE001 - exiting anyway; nothing to report to
            pass


# ---------------------------------------------------------------- mlx-lm without transformers


class _DeferredPackage(type(sys)):
    """``mlx_lm`` registered without running its ``__init__`` (which imports ``convert`` ->
    ``tokenizer_utils`` -> transformers -> torch: ~3 s). Its submodules import as usual; the first
    lookup of a package-level name (``mlx_lm.load``, ``from mlx_lm import generate``, ...) runs
    the real ``__init__`` then, so every use of mlx-lm keeps working."""

    def __getattr__(self, name):
        if self.__dict__.get("_mlx_openelm_initialised") or name in ("__path__", "__file__", "__spec__"):
            raise AttributeError(name)
        self.__dict__["_mlx_openelm_initialised"] = True
        with open(self.__file__) as f:
            exec(compile(f.read(), self.__file__, "exec"), self.__dict__)
        return getattr(self, name)


def defer_mlx_lm_init() -> bool:
    """Register ``mlx_lm`` as a ``_DeferredPackage`` (unless already imported), so that importing
    the submodules we use (``mlx_lm.models.cache``, ``mlx_lm.sample_utils``, ``mlx_lm.models.openelm``)
    does not import transformers and torch. Set ``MLX_OPENELM_EAGER_MLX_LM=1`` to opt out.
    Returns whether the package was deferred."""
    import importlib.util

    if "mlx_lm" in sys.modules or os.environ.get("MLX_OPENELM_EAGER_MLX_LM", "") not in ("", "0"):
        return False
    try:
        spec = importlib.util.find_spec("mlx_lm")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations or not spec.origin:
        return False  # not installed: the first import explains
    package = _DeferredPackage("mlx_lm")
    package.__file__, package.__spec__, package.__package__ = spec.origin, spec, "mlx_lm"
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mlx_lm"] = package
    return True
