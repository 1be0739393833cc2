"""Local Gradio chat over images with a Pico: `python -m app --help`."""

import bonsai_mlx  # noqa: F401  (OpenBLAS is preloaded at the first mlx.core import on Linux)
