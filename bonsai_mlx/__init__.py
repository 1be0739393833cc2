"""Pico: a sub-1B vision-language model (SigLIP + MLP projector + Qwen2) in MLX.

Importing this package is light: it loads neither MLX nor torch, so the CUDA side can use the shared
core (`bonsai_mlx.core`) in a PyTorch process. The OpenBLAS preload that MLX's CPU backend wants on
Linux happens at the first `import mlx.core`, wherever that comes from (see `_blas.install_hook`).
"""

from bonsai_mlx._blas import install_hook

install_hook()

__version__ = "0.1.0"

_API = ("load", "generate", "stream_generate", "ChatSession", "Sampling", "Chunk")
__all__ = list(_API)


def __getattr__(name: str):
    """`from bonsai_mlx import load, generate, ...`: the API (bonsai_mlx/api.py), imported at first use, so that
    `import bonsai_mlx` stays free of MLX."""
    if name in _API:
        from bonsai_mlx import api  # (importing it binds the submodule bonsai_mlx.generate here: rebind all names)

        globals().update({n: getattr(api, n) for n in _API})
        return globals()[name]
    raise AttributeError(f"module 'bonsai_mlx' has no attribute {name!r}")
