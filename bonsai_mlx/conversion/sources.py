"""Read checkpoint tensors from any source: safetensors (no torch needed) or PyTorch pickles (safely)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from bonsai_mlx.core.io import CheckpointError
from bonsai_mlx.weights import load_weights


def _torch_file(path: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading PyTorch .bin/.pt weights needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable PyTorch state dict ({type(e).__name__}: {e})") from None
    out = {}
    for k, v in state.items():
        if v.dtype == torch.bfloat16:
            out[k] = mx.array(v.float().numpy()).astype(mx.bfloat16)
        else:
            out[k] = mx.array(np.ascontiguousarray(v.numpy()))
    return out


def read_tensors(model_dir: str | Path) -> dict[str, mx.array]:
    """All tensors of a model directory, safetensors preferred."""
    d = Path(model_dir)
    try:
        return load_weights(d)
    except CheckpointError:
        pickles = sorted(d.glob("*.bin")) + sorted(d.glob("*.pt"))
        if not pickles:
            raise
    out: dict[str, mx.array] = {}
    for f in pickles:
        if f.name.startswith("training_args"):
            continue
        out.update(_torch_file(f))
    return out


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def cast(weights: dict[str, mx.array], dtype: str | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    t = DTYPES[dtype]
    return {k: v.astype(t) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
