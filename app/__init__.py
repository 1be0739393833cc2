"""Local Gradio chat over images with a Pico: `python -m app --help`."""

import bonsai_mlx  # noqa: F401  (loads OpenBLAS before mlx.core on Linux)
