"""PyTorch/CUDA side: teacher hidden-state extraction, QLoRA SFT and distillation (the LM in NF4, bf16 compute,
FlashAttention-2 when installed, else SDPA's flash kernel), and `train_cuda.bench` for their speed targets.

Shares data, alignment and cache code with `bonsai_mlx.core` (which imports neither mlx nor torch).
"""
