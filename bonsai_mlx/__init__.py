"""Pico: a sub-1B vision-language model (SigLIP + MLP projector + Qwen2) in MLX."""

from bonsai_mlx._blas import preload_openblas

preload_openblas()  # must precede the first `import mlx.core`

__version__ = "0.1.0"
