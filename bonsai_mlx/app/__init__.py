"""Local Gradio chat over images with a Pico: `bonsai app --help` (or `python -m bonsai_mlx.app`)."""
