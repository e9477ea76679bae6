"""Builds the optional CPU kernels (mlx_openelm/kernels/_ext) on Linux; everything is in pyproject.toml.

The extension is optional: when it cannot be built (no compiler or cmake, another platform,
MLX_OPENELM_BUILD_KERNELS=0) the install goes on without it and mlx-openelm uses plain MLX.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _builder():
    spec = importlib.util.spec_from_file_location("_mlx_openelm_kernels_build", HERE / "mlx_openelm" / "kernels" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class OptionalCMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        try:
            builder = _builder()
            if builder.should_build():
                builder.build(out_dir)
        except Exception as e:  # optional: never fail the install
            first = str(e).splitlines()[0] if str(e) else repr(e)
            sys.stderr.write(f"mlx-openelm: CPU kernels not built, plain MLX will be used ({first})\n")

    def get_outputs(self):
        return [p for p in super().get_outputs() if Path(p).exists()]


setup(
    ext_modules=[Extension("mlx_openelm.kernels._ext", sources=[], optional=True)],
    cmdclass={"build_ext": OptionalCMakeBuild},
)
