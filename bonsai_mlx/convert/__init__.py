"""`bonsai convert --help` (or `python -m bonsai_mlx.convert`): a thin CLI over `bonsai_mlx.conversion`."""
