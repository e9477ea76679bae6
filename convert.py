"""Convert an OpenELM checkpoint to an MLX model folder, e.g.

    python convert.py --hf apple/OpenELM-270M-Instruct --tokenizer path/to/tokenizer.model -q

Same options as ``mlx-openelm convert`` (``python convert.py --help``).
"""

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
from mlx_openelm.convert import main

if __name__ == "__main__":
    main()
