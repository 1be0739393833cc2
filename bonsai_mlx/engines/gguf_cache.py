"""The GGUF pair llama.cpp runs a Pico from, made on first use into a cache beside the model.

`bonsai convert to-gguf` writes the language-model GGUF and the `mmproj` GGUF (vision tower + projector).
The llama.cpp engine takes a Pico directory as it is: the first time a GGUF type is asked for, the pair is made
in `<model>/.gguf/<type>/` (or, where the model directory is read-only, under `$BONSAI_CACHE/gguf/`) by that
command in a child process (so the engine's own process never holds the float weights), and a fingerprint is
written beside it. Later runs reuse the pair while the fingerprint matches:

* fast path: name, size and mtime of every file the converter reads (weights, config, tokenizer, template,
  image processor) are as recorded;
* otherwise the files' contents are hashed; the same contents (a copy, a `touch`) only refresh the record,
  other contents (new weights) make the pair again;
* the converter itself is part of the key (its source and the `gguf` package version), so a fixed exporter
  never serves a stale file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx.core.errors import UserError

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
READ_SUFFIXES = (".safetensors", ".json", ".jinja")  # what `convert to-gguf` reads from a model directory
RECORD = "fingerprint.json"


@dataclass(frozen=True)
class GGUFPair:
    lm: Path
    mmproj: Path
    kind: str
    made: bool  # made now (False: reused from the cache)


def _inputs(model_dir: Path) -> list[Path]:
    files = (p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(p for p in files if p.suffix in READ_SUFFIXES)


def stat_key(model_dir: Path) -> list[list]:
    """Name, size and mtime (ns) of each file the converter reads."""
    out = []
    for p in _inputs(model_dir):
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def content_key(model_dir: Path) -> str:
    """sha256 over the names and contents of the files the converter reads."""
    h = hashlib.sha256()
    for p in _inputs(model_dir):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def converter_key() -> str:
    """The exporter's identity: its source and the gguf package's version."""
    from importlib.metadata import PackageNotFoundError, version

    from bonsai_mlx.conversion import gguf as exporter

    h = hashlib.sha256(Path(exporter.__file__).read_bytes())
    try:
        h.update(version("gguf").encode())
    except PackageNotFoundError:
        pass
    return h.hexdigest()[:16]


def cache_root(model_dir: Path) -> Path:
    """`<model>/.gguf`, or a folder under $BONSAI_CACHE when the model directory cannot be written."""
    beside = model_dir / ".gguf"
    if (beside.is_dir() and os.access(beside, os.W_OK)) or (not beside.exists() and os.access(model_dir, os.W_OK)):
        return beside
    home = Path(os.environ.get("BONSAI_CACHE", Path.home() / ".cache" / "bonsai_mlx"))
    return home / "gguf" / hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]


def names(model_dir: Path, kind: str) -> tuple[str, str]:
    """The file names `convert to-gguf` gives the pair."""
    return f"{model_dir.name}-{kind}.gguf", f"mmproj-{model_dir.name}-{'f32' if kind == 'f32' else 'f16'}.gguf"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One maker at a time per cache folder (another process waits, then finds the pair made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock, the rename below is still atomic
            pass
        yield


def _read_record(d: Path) -> dict | None:
    try:
        return json.loads((d / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _write_record(d: Path, record: dict) -> None:
    tmp = d / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(d / RECORD)


def _valid(d: Path, model_dir: Path, kind: str, conv: str) -> bool:
    """The cached pair is there and made from these inputs by this converter (refreshes the stat record when
    only the stats changed)."""
    rec = _read_record(d)
    lm, mm = names(model_dir, kind)
    if rec is None or rec.get("converter") != conv or not (d / lm).is_file() or not (d / mm).is_file():
        return False
    if rec.get("stat") == stat_key(model_dir):
        return True
    if rec.get("content") != content_key(model_dir):
        return False
    _write_record(d, {**rec, "stat": stat_key(model_dir)})
    return True


def _convert(model_dir: Path, out: Path, kind: str) -> None:
    """`bonsai convert to-gguf` in a child process: the float weights it reads never enter this process."""
    cmd = [sys.executable, "-m", "bonsai_mlx.convert", "to-gguf", str(model_dir), str(out), "--type", kind]
    root = Path(__file__).resolve().parents[2]  # where this bonsai_mlx lives: the child runs the same code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"{model_dir}: making the llama.cpp files (convert to-gguf --type {kind}) failed: {last}")


def ensure(model_dir: str | Path, kind: str = "q4_0", log=None) -> GGUFPair:
    """The GGUF pair of `model_dir` for `kind`, made now if the cache has none for these weights."""
    if kind not in TYPES:
        raise UserError(f"--gguf-type {kind!r}: expected one of {', '.join(TYPES)}")
    model_dir = Path(model_dir)
    d = cache_root(model_dir) / kind
    lm, mm = names(model_dir, kind)
    conv = converter_key()
    if _valid(d, model_dir, kind, conv):
        return GGUFPair(d / lm, d / mm, kind, made=False)
    with _locked(d.parent / f".{kind}.lock"):
        if _valid(d, model_dir, kind, conv):  # made by another process meanwhile
            return GGUFPair(d / lm, d / mm, kind, made=False)
        if log:
            log(f"making the llama.cpp files ({kind}) in {d} (once: reused while the weights are unchanged) ...")
        before = stat_key(model_dir), content_key(model_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=d.parent))
        try:
            _convert(model_dir, tmp, kind)
            if (stat_key(model_dir), content_key(model_dir)) != before:
                raise UserError(f"{model_dir}: the weights changed while the llama.cpp files were being made; retry")
            _write_record(tmp, {"kind": kind, "converter": conv, "stat": before[0], "content": before[1]})
            if d.exists():
                old = d.with_name(f".{kind}-old-{os.getpid()}")
                d.rename(old)
                _rmtree(old)
            tmp.rename(d)
        finally:
            if tmp.exists():
                _rmtree(tmp)
    return GGUFPair(d / lm, d / mm, kind, made=True)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
