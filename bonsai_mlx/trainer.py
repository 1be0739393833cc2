"""The MLX training loop: per-stage freezing, the LR schedule, accumulation, data-parallel, SIGINT-safe."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from bonsai_mlx import lora
from bonsai_mlx.checkpoint import load_checkpoint, save_checkpoint
from bonsai_mlx.core.batching import Batch, BatchSchedule, collate, prefetch
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.records import Dataset
from bonsai_mlx.core.train_config import STAGES, TrainConfig
from bonsai_mlx.loss import ce_at, forward_states, to_mx
from bonsai_mlx.model import Pico


def setup_trainable(model: Pico, cfg: TrainConfig) -> None:
    """Freeze per stage: align = projector; instruct/distill = projector + LoRA; full = everything."""
    if cfg.stage not in STAGES:
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    if cfg.stage == "full":
        model.unfreeze()
    else:
        model.freeze()
        if cfg.stage in ("instruct", "distill"):
            targets = tuple(t for t in cfg.lora_targets.split(",") if t)
            lora.apply_lora(model, targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        model.multi_modal_projector.unfreeze()
        if cfg.train_vision:
            model.vision_tower.unfreeze()
    # Trainable weights (and so AdamW's state) live in fp32 whatever the frozen dtype: pure fp16 + AdamW diverges.
    fp32 = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.trainable_parameters()) if v.dtype != mx.float32]
    if fp32:
        model.load_weights(fp32, strict=False)


def lr_schedule(cfg: TrainConfig, total_steps: int) -> Callable:
    warm = max(1, min(cfg.warmup, total_steps - 1))
    decay = optim.cosine_decay(cfg.lr, max(1, total_steps - warm), end=cfg.lr * 0.05)
    return optim.join_schedules([optim.linear_schedule(cfg.lr * 0.01, cfg.lr, warm), decay], [warm])


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: Pico,
        processor,
        train: Dataset,
        evaluate: Dataset | None = None,
        extra_loss: Callable | None = None,
        extra_params: nn.Module | None = None,
        on_eval: Callable | None = None,
        augment: Callable | None = None,
    ):
        self.cfg, self.model, self.proc, self.train, self.eval_ds = cfg, model, processor, train, evaluate
        self.extra_loss, self.extra, self.on_eval, self.augment = extra_loss, extra_params, on_eval, augment
        # Under `mlx.launch` (MLX_RANK set) train data-parallel: shard the batches, average the gradients.
        self.group = mx.distributed.init() if os.environ.get("MLX_RANK") is not None else None
        self.rank = self.group.rank() if self.group is not None else 0
        self.world = self.group.size() if self.group is not None else 1
        if self.world > 1 and self.rank == 0:
            print(f"data-parallel over {self.world} processes")
        if not train.examples:
            raise UserError("no usable training samples (" + train.summary() + ")")
        self.schedule = BatchSchedule(
            [len(e.ids) for e in train.examples], cfg.batch_size, cfg.seed, cfg.group_by_length, self.rank, self.world
        )
        self.batches_per_epoch = self.schedule.per_epoch
        micro_total = (
            cfg.max_steps * cfg.grad_accum if cfg.max_steps else math.ceil(self.batches_per_epoch * cfg.epochs)
        )
        self.total_steps = max(1, micro_total // cfg.grad_accum)
        self.optimizer = optim.AdamW(learning_rate=lr_schedule(cfg, self.total_steps), weight_decay=cfg.weight_decay)
        self.step = 0
        self.out = Path(cfg.out)
        self.params_holder = nn.Module()
        self.params_holder.model = model
        if extra_params is not None:
            self.params_holder.extra = extra_params
        self.loss_and_grad = nn.value_and_grad(self.params_holder, self._loss)
        self.skipped: dict[str, str] = dict(train.bad)
        self.run_info: dict = {}  # saved in each checkpoint's state.json (e.g. that this is the embedded default)

    # -- loss -------------------------------------------------------------------------------------
    def _loss(self, batch: dict, step_frac: mx.array):
        keep = tuple(self.extra.student_layers) if self.extra_loss is not None else ()
        h, kept = forward_states(
            self.model, batch, self.cfg.train_vision or self.cfg.stage == "full", self.cfg.grad_checkpoint, keep
        )
        n = batch["targets"].shape[0]
        ce = ce_at(self.model, h, batch["positions"], batch["targets"]) / max(n, 1)
        if self.extra_loss is None:
            return ce, ce
        return self.extra_loss(ce, {**kept, "final": h}, batch, step_frac)  # "final": the normed last state

    # -- data -------------------------------------------------------------------------------------
    def micro_batches(self, start_micro: int):
        micro = start_micro
        while True:
            yield collate([self.train.examples[j] for j in self.schedule[micro]], self.proc, self.pad_id)
            micro += 1

    @property
    def pad_id(self) -> int:
        t = self.proc.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else 0

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self, batches: list[Batch]) -> tuple[float, int, dict]:
        """One optimizer step over `grad_accum` micro-batches: the gradient is the mean over the micro-batches that
        were used, on every process (a skipped one, e.g. all of its images corrupt, counts nowhere); a process
        whose micro-batches were all skipped still joins the all_sum, with zeros."""
        grads_sum, loss_sum, tokens, aux, used = None, 0.0, 0, {}, 0
        self.model.train()  # dropout on
        frac = mx.array(self.step / max(1, self.total_steps - 1))
        for i, b in enumerate(batches):
            self.skipped.update(b.skipped)
            if not b.ids:
                continue
            # dropout depends on (step, micro-batch, process) only: each micro-batch draws its own masks, and a
            # resumed run draws the same ones
            micro = self.step * len(batches) + i
            mx.random.seed(self.cfg.seed * 1_000_003 + micro * self.world + self.rank)
            bm = to_mx(b)
            if self.augment is not None:
                bm.update(self.augment(b))
            (loss, parts), grads = self.loss_and_grad(bm, frac)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            mx.eval(grads_sum, loss)
            loss_sum += loss.item()
            # the loss's parts (ce; distillation adds feat, kl, kl_coverage), logged as the mean over micro-batches
            for key, v in (parts if isinstance(parts, dict) else {"ce": parts}).items():
                aux[key] = aux.get(key, 0.0) + v.item()
            tokens += b.n_tokens
            used += 1
        if grads_sum is None:
            grads_sum = tree_map(mx.zeros_like, self.params_holder.trainable_parameters())
        n = used
        if self.group is not None:
            grads_sum = tree_map(lambda g: mx.distributed.all_sum(g, group=self.group), grads_sum)
            n = int(mx.distributed.all_sum(mx.array(used), group=self.group).item())
        self.step += 1  # a step whose micro-batches were all skipped still consumes them (exact resume)
        if n == 0:
            return float("nan"), 0, aux
        grads = tree_map(lambda g: g / n, grads_sum)
        if self.cfg.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, self.cfg.grad_clip)
        self.optimizer.update(self.params_holder, grads)
        mx.eval(self.params_holder.parameters(), self.optimizer.state)
        k = max(used, 1)
        return loss_sum / k, tokens, {key: v / k for key, v in aux.items()}

    def eval_loss(self, limit: int = 64) -> float:
        ds = self.eval_ds
        if not ds or not ds.examples:
            return float("nan")
        self.model.eval()
        tot, n = 0.0, 0
        ex = ds.examples[:limit]
        for i in range(0, len(ex), self.cfg.batch_size):
            b = collate(ex[i : i + self.cfg.batch_size], self.proc, self.pad_id)
            if not b.ids:
                continue
            bm = to_mx(b)
            h, _ = forward_states(self.model, bm, False, False)
            tot += ce_at(self.model, h, bm["positions"], bm["targets"]).item()
            n += len(b.targets)
        return tot / max(n, 1)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, final: bool = False) -> Path | None:
        if self.rank != 0:
            return None
        name = "final" if final else f"step-{self.step:07d}"
        return save_checkpoint(
            self.out,
            name,
            self.params_holder,
            self.optimizer,
            self.model,
            self.cfg,
            self.step,
            self.total_steps,
            len(self.skipped),
            self.run_info,
        )

    def load_checkpoint(self, path: str | Path) -> None:
        self.step = load_checkpoint(path, self.params_holder, self.optimizer)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, log: Callable[[str], None] = print) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        stop = {"now": False}
        prev = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
        it = prefetch(self.micro_batches(self.step * cfg.grad_accum))
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"train ({cfg.stage})",
            disable=self.rank != 0,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        last = {"loss": float("nan")}
        t_tok, t0 = 0, time.perf_counter()
        try:
            while self.step < self.total_steps and not stop["now"]:
                batches = [next(it) for _ in range(cfg.grad_accum)]
                loss, ntok, aux = self.train_step(batches)
                t_tok += ntok * self.world
                dt = time.perf_counter() - t0
                last = {
                    "step": self.step,
                    "loss": loss,
                    "lr": float(self.optimizer.learning_rate),
                    "tokens_per_s": t_tok / dt,
                    "peak_gb": mx.get_peak_memory() / 1e9,
                    **aux,
                }
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.3f}", tok_s=f"{t_tok / dt:.0f}", peak=f"{last['peak_gb']:.2f}GB", refresh=False
                )
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.rank == 0:
                    ev = {"step": self.step, "eval_loss": self.eval_loss()}  # (puts the model in eval mode)
                    if self.on_eval:
                        ev.update(self.on_eval(self))
                    bar.write(
                        "eval "
                        + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items())
                    )
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(ev) + "\n")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            signal.signal(signal.SIGINT, prev)
        if stop["now"]:
            ck = self.save_checkpoint()
            log(f"interrupted at step {self.step}: saved {ck}; continue with --resume {self.out}")
            raise KeyboardInterrupt
        self.save_checkpoint(final=True)
        self.model.eval()
        return last


def seed_everything(seed: int) -> None:
    mx.random.seed(seed)
    np.random.seed(seed)
