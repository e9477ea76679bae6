"""Convert an OpenELM checkpoint to an MLX model folder, e.g.

    python convert.py --hf apple/OpenELM-270M-Instruct --tokenizer path/to/tokenizer.model -q

Same options as ``mlx-openelm convert`` (``python convert.py --help``).
"""

import sys

from mlx_openelm.cli import run

if __name__ == "__main__":
    run("convert", sys.argv[1:])
