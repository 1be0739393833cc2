"""Atomic file writes and safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlx is imported lazily: the CUDA side uses the text helpers without it
    import mlx.core as mx

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A model directory whose weights cannot be read."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(path: str | Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    import mlx.core as mx

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
    import mlx.core as mx

    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises bare RuntimeError/ValueError for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    if (d / INDEX).is_file():
        try:
            index = json.loads((d / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise CheckpointError(f"{d / INDEX}: expected JSON with a 'weight_map' object") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CheckpointError(f"{d / INDEX}: names shard {missing[0]} which is not in {d}")
        return [d / n for n in names]
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        return shards
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise CheckpointError(
            f"{d}: has PyTorch pickle weights only; convert them first with "
            f"`python -m convert to-mlx {d} OUT` (loads them safely, weights_only=True)"
        )
    raise CheckpointError(f"{d}: no *.safetensors weights found")


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
