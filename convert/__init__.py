"""`python -m convert` from a checkout; the CLI itself is `bonsai_mlx.convert` (this folder is not installed)."""
