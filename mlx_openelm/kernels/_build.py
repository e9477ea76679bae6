"""Build the optional CPU extension ``mlx_openelm/kernels/_ext*.so`` with CMake.

Self-contained (standard library only, imports nothing from ``mlx_openelm``) so that ``setup.py``
can load it by path inside pip's build environment. Needs ``cmake``, a C++17 compiler, ``nanobind``
and ``mlx`` with its C++ headers and ``libmlx`` (on Linux: the ``mlx[cpu]`` wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"


def should_build() -> bool:
    """Only Linux CPUs need the fast path (macOS runs Metal, CUDA machines their GPU);
    ``MLX_OPENELM_BUILD_KERNELS=0`` skips the build."""
    if os.environ.get("MLX_OPENELM_BUILD_KERNELS", "1").lower() in ("0", "false", "no"):
        return False
    return sys.platform.startswith("linux")


def build(out_dir, build_dir=None, python: str = sys.executable, quiet: bool = True) -> Path:
    """Configure and build the extension into ``out_dir``; returns the built file.
    Raises ``RuntimeError`` (with the tail of the build log) when the build fails."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as _cmake_pkg  # the PyPI wheel

            cmake = str(Path(_cmake_pkg.CMAKE_BIN_DIR) / "cmake")
        except (ImportError, AttributeError) as e:
            raise RuntimeError("cmake is not installed (pip install cmake)") from e
    tmp = None
    if build_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mlx_openelm_kernels_")
        build_dir = tmp.name
    try:
        jobs = str(max(1, min(4, os.cpu_count() or 1)))
        staged = Path(build_dir) / "out"
        steps = [
            [cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             f"-DPython_EXECUTABLE={python}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={staged}"],
            [cmake, "--build", str(build_dir), "-j", jobs],
        ]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=quiet, text=True)
            if r.returncode != 0:
                log = ((r.stdout or "") + (r.stderr or ""))[-3000:]
                raise RuntimeError(f"building the CPU kernels failed: {' '.join(cmd[:2])} ...\n{log}")
        # Moved in by rename: a process that has the old file loaded keeps its copy (writing over a loaded
        # library in place crashes it), and a failed build leaves the old one untouched.
        for f in staged.glob("_ext*.so"):
            part = out_dir / (f.name + ".part")
            shutil.copy2(f, part)
            os.replace(part, out_dir / f.name)
    finally:
        if tmp is not None:
            tmp.cleanup()
    built = sorted(out_dir.glob("_ext*.so"))
    if not built:
        raise RuntimeError(f"the build finished but left no _ext*.so in {out_dir}")
    return built[0]
