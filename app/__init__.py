"""`python -m app` from a checkout; the app itself is `bonsai_mlx.app` (this folder is not installed)."""
