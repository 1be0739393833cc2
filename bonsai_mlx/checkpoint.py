"""Training checkpoints: trainables, optimizer state, PEFT adapter, projector and the step, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from bonsai_mlx import lora
from bonsai_mlx.core.errors import InputNotFound
from bonsai_mlx.core.io import CheckpointError, atomic_write_text
from bonsai_mlx.core.train_config import TrainConfig
from bonsai_mlx.loading import hf_state
from bonsai_mlx.model import Pico
from bonsai_mlx.weights import atomic_save_safetensors


def save_checkpoint(
    out: Path,
    name: str,
    params: nn.Module,
    optimizer: optim.Optimizer,
    model: Pico,
    cfg: TrainConfig,
    step: int,
    total_steps: int,
    skipped: int,
    info: dict | None = None,
) -> Path:
    """Write `out/checkpoints/<name>` (via a temp dir) and point `checkpoints/latest` at it."""
    ck = out / "checkpoints" / name
    tmp = ck.with_name(f".{name}.tmp")
    _finish_swap(out / "checkpoints")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = dict(tree_flatten(params.trainable_parameters()))
    atomic_save_safetensors(tmp / "trainable.safetensors", trainable)
    opt = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    atomic_save_safetensors(tmp / "optimizer.safetensors", opt)
    if cfg.stage in ("instruct", "distill"):
        lora.save_adapter(
            model, tmp, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","), cfg.model or ""
        )
    proj = {k: v for k, v in hf_state(model).items() if k.startswith("multi_modal_projector.")}
    atomic_save_safetensors(tmp / "projector.safetensors", proj)
    state = {"step": step, "total_steps": total_steps, "config": asdict(cfg), "skipped": skipped, "time": time.time()}
    state.update(info or {})
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
    latest = out / "checkpoints" / "latest"
    if ck.exists():
        # Replacing a checkpoint (e.g. Ctrl-C right after a periodic save of the same step): `latest` names the
        # complete new copy before the old one goes, so a kill at any moment leaves one to resume from.
        atomic_write_text(latest, tmp.name + "\n")
        shutil.rmtree(ck)
    os.replace(tmp, ck)  # (a kill right here: `latest` names the temp dir, which resolve_checkpoint maps to ck)
    atomic_write_text(latest, name + "\n")
    return ck


def _finish_swap(root: Path) -> None:
    """A run killed while replacing a checkpoint left `latest` naming the complete temp copy: put it in place."""
    latest = root / "latest"
    name = latest.read_text().strip() if latest.is_file() else ""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return
    final = root / name[1:-4]
    if (root / name / "state.json").is_file():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(root / name, final)
    atomic_write_text(latest, final.name + "\n")


def load_checkpoint(path: str | Path, params: nn.Module, optimizer: optim.Optimizer) -> int:
    """Restore trainables and optimizer state in place; returns the step to continue from."""
    ck = resolve_checkpoint(path)
    state = json.loads((ck / "state.json").read_text())
    trainable = mx.load(str(ck / "trainable.safetensors"))
    params.load_weights(list(trainable.items()), strict=False)
    optimizer.init(params.trainable_parameters())
    saved = mx.load(str(ck / "optimizer.safetensors"))
    flat = dict(tree_flatten(optimizer.state))
    missing = sorted(set(flat) - set(saved))
    if missing:
        raise CheckpointError(f"{ck}: optimizer state lacks {missing[0]}; was it written by a different setup?")
    optimizer.state = tree_unflatten(list(saved.items()))
    mx.eval(params.parameters(), optimizer.state)
    return state["step"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        ck = p / "checkpoints" / name
        if not (ck / "state.json").is_file() and name.startswith(".") and name.endswith(".tmp"):
            ck = p / "checkpoints" / name[1:-4]  # killed between renaming the new copy into place and `latest`
        if not (ck / "state.json").is_file():
            raise CheckpointError(f"{latest}: names {name}, which is not a complete checkpoint")
        return ck
    raise InputNotFound(f"{p}: no checkpoint here (expected state.json or checkpoints/latest)")
