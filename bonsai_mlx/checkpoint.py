"""MLX training checkpoints: trainables, optimizer state, PEFT adapter, projector and the step, written by the
shared run protocol (core/runs.py: temp directory, `state.json` last, crash-safe swap of `latest`)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from bonsai_mlx import lora
from bonsai_mlx.core.io import CheckpointError
from bonsai_mlx.core.runs import RunDir, read_state, resolve_checkpoint
from bonsai_mlx.core.train_config import TrainConfig
from bonsai_mlx.loading import hf_state
from bonsai_mlx.model import Pico
from bonsai_mlx.weights import atomic_save_safetensors

__all__ = ["load_checkpoint", "resolve_checkpoint", "save_checkpoint"]


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
    """Write `out/checkpoints/<name>` and point `checkpoints/latest` at it."""
    runs = RunDir.of(out)
    tmp = runs.begin(name)
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
    return runs.commit(name, state)


def load_checkpoint(path: str | Path, params: nn.Module, optimizer: optim.Optimizer) -> int:
    """Restore trainables and optimizer state in place; returns the step to continue from."""
    ck = resolve_checkpoint(path)
    state = read_state(ck)
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
