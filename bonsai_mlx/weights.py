"""MLX arrays to and from safetensors: single files written atomically, sharded checkpoints with an index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from bonsai_mlx.core.io import INDEX, SINGLE, CheckpointError, atomic_write_text, weight_files


def atomic_save_safetensors(path: str | Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_file(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises bare RuntimeError/ValueError for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(model_dir: str | Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in weight_files(model_dir):
        weights.update(_load_file(f))
    return weights


def save_weights(model_dir: str | Path, weights: dict[str, mx.array], shard_bytes: int = 2 << 30) -> None:
    """Write `model.safetensors`, or shards plus an index past `shard_bytes`."""
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k in sorted(weights):
        v = weights[k]
        if shards[-1] and size + v.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    for old in list(d.glob("model*.safetensors")) + [d / INDEX]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        atomic_save_safetensors(d / SINGLE, shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(d / name, shard)
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in weights.values())
    atomic_write_text(d / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
