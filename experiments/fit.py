"""A plain PyTorch fitting loop for the experiments' small pre-training stages (everything trains): AdamW, the
trainers' one learning-rate curve (core/runs.py), gradient clipping, a log line every `log_every` steps.

The Phase I/II trainer is `train_cuda/trainer.py`; this is for models the experiments build from scratch, so it
lives with them (not installed).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bonsai_mlx.core.runs import lr_factor


def fit(
    model,
    loss_at: Callable[[int], object],
    steps: int,
    lr: float,
    *,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup: int | None = None,
    clip: float = 1.0,
    log_every: int = 25,
    log: Callable[[str], None] = print,
    name: str = "step",
) -> float:
    """Run `steps` optimizer steps of `loss_at(step)` (1-based; a scalar loss tensor); returns the last loss.
    Warmup defaults to the first 5% of the steps."""
    import torch

    warm = max(1, steps // 20) if warmup is None else warmup
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, warm, steps))
    model.train()
    t0, last = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        loss = loss_at(step)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        last = float(loss.item())
        if step % log_every == 0 or step == steps:
            log(f"{name} {step}/{steps}: loss {last:.4f} ({time.perf_counter() - t0:.0f} s)")
    return last
