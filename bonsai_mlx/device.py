"""Which MLX backend computes ("cpu", "metal" or "cuda"): one place, so every backend-aware path asks it
and a test can patch it to check a GPU decision on the CPU."""

from __future__ import annotations

import mlx.core as mx


def backend() -> str:
    """The backend of MLX's default device: "cpu", "metal", "cuda" (or "gpu" for another GPU backend)."""
    if mx.default_device().type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "gpu"


def is_cpu() -> bool:
    """True on MLX's CPU backend, where quantized matmuls over many rows are slow and half precision is emulated."""
    return backend() == "cpu"
