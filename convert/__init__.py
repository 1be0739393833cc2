"""Move Pico weights between PyTorch/Hugging Face and MLX: `python -m convert --help`."""

import bonsai_mlx  # noqa: F401  (loads OpenBLAS before mlx.core on Linux)
