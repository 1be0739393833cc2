"""Weights between PyTorch/Hugging Face and MLX: the library behind `python -m convert`."""
