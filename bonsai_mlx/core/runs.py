"""A training run's directory, the same for every trainer: the learning-rate curve, checkpoints written so that a
kill at any moment leaves one to resume from, one resume policy, and `metrics.jsonl`.

Layout: `out/metrics.jsonl`, `out/checkpoints/<name>/` (a trainer's files + `state.json`, written last) and
`out/checkpoints/latest` (the name of the newest complete checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.io import CheckpointError, atomic_write_text

# Options a resumed run may change: where it logs, how often it saves or evaluates, and how long it runs (a longer
# run stretches the cosine from the step it resumes at to its new end). Any other change would make the
# continuation a different run than the one the checkpoint started, so it is refused, naming the option.
RESUME_FREE = frozenset(
    {"out", "log_every", "save_every", "eval_every", "eval_data", "on_bad_sample", "cache_gb"}
    | {"max_steps", "epochs", "steps"}
)

WARMUP_START = 0.01  # warmup climbs from 1% of the peak ...
COSINE_FLOOR = 0.05  # ... and the cosine ends at 5% of it, not at 0 (the last steps still learn)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The fraction of the peak learning rate used by optimizer step `step` (0-based): linear warmup from 1% over
    `warmup` steps, then a cosine to a 5% floor at `total`. Every trainer and experiment uses this one curve."""
    warm = max(1, min(warmup, total - 1))
    if step < warm:
        return WARMUP_START + (1.0 - WARMUP_START) * step / warm
    t = min(step - warm, max(1, total - warm)) / max(1, total - warm)
    return COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    return lr * lr_factor(step, warmup, total)


def check_resume(
    where: str | Path, saved: dict[str, Any], now: dict[str, Any], free: Iterable[str] = RESUME_FREE
) -> None:
    """Refuse (one line, naming the first option) a resume whose options differ from the checkpoint's."""
    skip = set(free)
    for k in now:
        if k in skip or k not in saved:
            continue
        if _plain(saved[k]) != _plain(now[k]):
            raise UserError(
                f"{where}: --{k.replace('_', '-')} was {saved[k]!r} when the run started, now {now[k]!r}; a resumed "
                f"run keeps its options (only {', '.join(sorted('--' + f.replace('_', '-') for f in skip))} may "
                "change): drop the flag, or start a new run in another --out"
            )


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


class MetricsLog:
    """`metrics.jsonl`, one JSON object per line, written by the main process only."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """On resume: drop the lines logged after the checkpoint's step (the resumed run logs them again)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(keep) != len(lines):
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


class RunDir:
    """Checkpoints under `root` (usually `out/checkpoints`): `begin` gives a fresh temp directory to fill, `commit`
    writes `state.json` into it and swaps it in. A kill at any moment leaves `latest` naming a complete copy."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of(cls, out: str | Path) -> RunDir:
        return cls(Path(out) / "checkpoints")

    @property
    def latest_file(self) -> Path:
        return self.root / "latest"

    def tmp(self, name: str) -> Path:
        return self.root / f".{name}.tmp"

    def begin(self, name: str) -> Path:
        """Finish a swap a kill interrupted, then return an empty `.<name>.tmp` to write the checkpoint into."""
        self.finish_swap()
        tmp = self.tmp(name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, name: str, state: dict[str, Any], keep_only_latest: bool = False) -> Path:
        """Write `state.json` (the mark of a complete checkpoint) and put `.<name>.tmp` in place of `<name>`."""
        tmp, ck = self.tmp(name), self.root / name
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1, default=str))
        if ck.exists():
            # Replacing a checkpoint of the same name: `latest` names the complete new copy before the old one goes,
            # so a kill between the two steps leaves one to resume from (finish_swap / resolve map it back).
            atomic_write_text(self.latest_file, tmp.name + "\n")
            shutil.rmtree(ck)
        os.replace(tmp, ck)
        atomic_write_text(self.latest_file, name + "\n")
        if keep_only_latest:
            for old in self.root.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        return ck

    def finish_swap(self) -> None:
        """A run killed while replacing a checkpoint left `latest` naming the complete temp copy: put it in place."""
        name = self.latest_file.read_text().strip() if self.latest_file.is_file() else ""
        if not (name.startswith(".") and name.endswith(".tmp")):
            return
        final = self.root / name[1:-4]
        if (self.root / name / "state.json").is_file():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(self.root / name, final)
        atomic_write_text(self.latest_file, final.name + "\n")

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the run has none yet."""
        if not self.latest_file.is_file():
            return None
        name = self.latest_file.read_text().strip()
        ck = self.root / name
        if not (ck / "state.json").is_file() and name.startswith(".") and name.endswith(".tmp"):
            ck = self.root / name[1:-4]  # killed between renaming the new copy into place and rewriting `latest`
        if not (ck / "state.json").is_file():
            raise CheckpointError(f"{self.latest_file}: names {name}, which is not a complete checkpoint")
        return ck


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    ck = RunDir.of(p).latest()
    if ck is None:
        raise InputNotFound(f"{p}: no checkpoint here (expected state.json or checkpoints/latest)")
    return ck


def read_state(ck: str | Path) -> dict[str, Any]:
    return json.loads((Path(ck) / "state.json").read_text())


def save(out: str | Path, name: str, write: Callable[[Path], None], state: dict[str, Any]) -> Path:
    """One process's checkpoint in one call: `write(tmp_dir)` puts the trainer's files, then the swap."""
    runs = RunDir.of(out)
    tmp = runs.begin(name)
    write(tmp)
    return runs.commit(name, state)
