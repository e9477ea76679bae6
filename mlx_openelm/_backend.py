"""Pick a fast matmul on Linux CPUs before MLX loads.

The ``mlx-cpu`` wheel links the reference (netlib) BLAS. When the system has OpenBLAS,
loading it with RTLD_GLOBAL before ``mlx.core`` makes MLX's ``cblas_sgemm`` resolve to it
(9-30x faster float32 matmul). Set ``MLX_OPENELM_BLAS=reference`` to opt out.
"""

from __future__ import annotations

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
    return BLAS
