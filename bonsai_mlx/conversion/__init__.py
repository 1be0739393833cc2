"""Weights between PyTorch/Hugging Face and MLX: the library behind `bonsai convert` (bonsai_mlx/convert)."""
