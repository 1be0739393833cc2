"""Pico: a sub-1B vision-language model (SigLIP + MLP projector + Qwen2) in MLX.

Importing this package is light: it loads neither MLX nor torch, so the CUDA side can use the shared
core (`bonsai_mlx.core`) in a PyTorch process. The OpenBLAS preload that MLX's CPU backend wants on
Linux happens at the first `import mlx.core`, wherever that comes from (see `_blas.install_hook`).
"""

from bonsai_mlx._blas import install_hook

install_hook()

__version__ = "0.1.0"
