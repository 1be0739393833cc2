"""`python -m convert --help`: a thin CLI over `bonsai_mlx.conversion` (moves Pico weights between HF and MLX)."""
