"""What a teacher cache was made from, checked where it is made and where it is read (NumPy and hashlib only).

- The data: a file by its content (sha256 + size: the same file under another path is the same data), a
  `datasets` directory or hub id by the fingerprint `datasets` gives it (never opened as a file).
- Each sample: a digest of the student's token ids up to the last position its targets use, so an edited
  record (or id-less records renumbered by a filter) is refused instead of trained toward another's targets.
- The size: an estimate from a sample of plans, checked against the free space before the teacher loads.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from bonsai_mlx.core.errors import UserError


def data_fingerprint(source: str | Path) -> dict:
    """{"kind": "file", "sha256", "bytes"} for a file; {"kind": "datasets", "fingerprint"} for a `datasets`
    directory or hub id (its own fingerprint, which changes with its content or revision)."""
    p = Path(source)
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"kind": "file", "sha256": h.hexdigest(), "bytes": p.stat().st_size}
    import datasets

    ds = datasets.load_from_disk(str(p)) if p.is_dir() else datasets.load_dataset(str(source), split="train")
    return {"kind": "datasets", "fingerprint": ds._fingerprint, "rows": len(ds)}


def same_data(a: dict | None, b: dict | None) -> bool:
    """Two fingerprints name the same data (paths never count; caches from before "kind" were files)."""
    if not a or not b:
        return a == b
    key = ("sha256", "bytes") if a.get("kind", "file") == "file" else ("fingerprint",)
    return a.get("kind", "file") == b.get("kind", "file") and all(a.get(k) == b.get(k) for k in key)


def describe_data(fp: dict | None) -> str:
    if not fp:
        return "unknown data"
    if fp.get("kind", "file") == "file":
        return f"{fp.get('bytes', '?')} bytes, sha256 {str(fp.get('sha256'))[:12]}"
    return f"datasets fingerprint {fp.get('fingerprint')}"


def ids_digest(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()[:16]


def ids_check(ids: list[int], positions: list[int]) -> tuple[int, str]:
    """(n, digest of ids[:n]), n = the last used position + 2 (its next token too), or every id when none is
    used: targets depend on the text up to there only (causal), so later edits or truncation do not matter."""
    n = min(len(ids), max(positions) + 2) if positions else len(ids)
    return n, ids_digest(ids[:n])


def estimate_bytes(
    text_units: int, image_units: int, layers: int, width: int, logit_units: int = 0, topk: int = 0
) -> int:
    """Bytes one sample takes in a cache: fp16 states per unit and layer, top-k (int32 ids, fp16 logits) and a
    float32 logsumexp per logit unit, plus the safetensors headers and JSON index (about 100 bytes a tensor,
    16 a position)."""
    states = (text_units + image_units) * layers * width * 2
    logits = logit_units * (topk * 6 + 4) if topk else 0
    tensors = layers * (1 + bool(image_units)) + (3 if topk else 0)
    return states + logits + 100 * tensors + 16 * (2 * text_units + (3 * logit_units if topk else 0)) + 80


def human(n: float) -> str:
    """Bytes as GB, MB or kB (one decimal place more for small numbers)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def free_bytes(path: str | Path) -> int:
    """Free space on the disk that holds `path` (or the nearest folder above it that exists)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_space(path: str | Path, need: int, what: str) -> None:
    """Refuse in one line when `need` bytes do not fit on `path`'s disk."""
    free = free_bytes(path)
    if need > free:
        raise UserError(
            f"{path}: {what} needs about {human(need)}, the disk has {human(free)} free; "
            "free space, use another --out, or make it smaller (--pca K, fewer --layers, --max-samples)"
        )
