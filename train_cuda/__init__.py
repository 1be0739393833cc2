"""PyTorch/CUDA side: teacher hidden-state extraction, QLoRA + FlashAttention-2 SFT and distillation.

Shares data, alignment and cache code with `bonsai_mlx` (those modules import without mlx).
"""
