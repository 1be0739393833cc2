"""The predictions file `evaluate` writes: a header line naming what made it, then one JSON row per record.

`evaluate` resumes from this file, so it must never resume from another run's file: evaluating model B into the
file model A wrote would report A's answers. The header names the model (its path and a sha256 of its weight
files), the data (a sha256 of the file or dataset) and the generation settings; a file whose header differs,
or that has none, is refused in one line, never reused and never deleted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.io import weight_files

KIND = "bonsai_mlx.evaluate predictions"
VERSION = 1
_CHUNK = 1 << 20


def _hash_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over a model directory's weight files (names and bytes): the model's identity, wherever it lives."""
    d = Path(model_dir)
    return _hash_files(weight_files(d), d)


def data_sha256(source: str | Path | None, records: list[dict]) -> str:
    """sha256 of the eval data: the file's bytes, a datasets directory's files, else (a hub dataset, or no
    source) the records themselves."""
    p = Path(source) if source is not None else None
    if p is not None and p.is_file():
        return _hash_files([p], p.parent)
    if p is not None and p.is_dir():
        return _hash_files(sorted(f for f in p.rglob("*") if f.is_file()), p)
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=repr).encode()).hexdigest()


def header(model_dir: str | Path, data: str, data_hash: str, image_root: str | None, max_tokens: int) -> dict[str, Any]:
    """The first line of a predictions file."""
    return {
        "kind": KIND,
        "version": VERSION,
        "model": {"path": str(model_dir), "weights_sha256": weights_sha256(model_dir)},
        "data": {"path": str(data), "sha256": data_hash, "image_root": image_root},
        "generation": {"decoding": "greedy", "max_tokens": max_tokens},
    }


def _identity(h: dict) -> dict:
    """What must agree for rows to be reused (paths may move; the weights, the data and the settings may not)."""
    return {
        "version": h.get("version"),
        "weights": (h.get("model") or {}).get("weights_sha256"),
        "data": (h.get("data") or {}).get("sha256"),
        "image_root": (h.get("data") or {}).get("image_root"),
        "generation": h.get("generation"),
    }


def read(path: Path, want: dict) -> dict[str, dict]:
    """The rows of an earlier run with the same header (id -> its last row); {} when there is no file yet.
    Raises UserError, naming the first difference, when the file belongs to another run."""
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    lines = path.read_text().splitlines()
    try:
        first = json.loads(lines[0])
    except (ValueError, IndexError):
        first = None
    if not isinstance(first, dict) or first.get("kind") != KIND:
        raise UserError(
            f"{path}: has no header naming its model and data (an older bonsai_mlx or another tool wrote it), so "
            "its rows cannot be trusted for this run; give another --out"
        )
    old, new = _identity(first), _identity(want)
    for k in new:
        if old[k] != new[k]:
            raise UserError(
                f"{path}: holds predictions of another run ({k}: {_short(old[k])} there, {_short(new[k])} now; "
                f"model there: {first.get('model', {}).get('path')}); give another --out"
            )
    rows: dict[str, dict] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash: that record is simply redone
            continue
        if isinstance(row, dict) and "id" in row:
            rows[str(row["id"])] = row
    return rows


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s[1:13] + "…" if isinstance(v, str) and len(v) > 12 else s


def start(path: Path, head: dict) -> None:
    """Begin a new predictions file with its header (only when there is none yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.stat().st_size == 0:
        with open(path, "w") as f:
            f.write(json.dumps(head) + "\n")


def rows(path: Path) -> list[dict]:
    """The prediction rows of a file (its header left out)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("kind") != KIND:
                out.append(r)
    return out
