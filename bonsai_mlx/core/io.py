"""Atomic file writes and where a model directory keeps its safetensors (no tensor library needed)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bonsai_mlx.core.errors import BonsaiError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(BonsaiError, ValueError):
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
            f"`python -m bonsai_mlx.convert to-mlx {d} OUT` (loads them safely, weights_only=True)"
        )
    raise CheckpointError(f"{d}: no *.safetensors weights found")
