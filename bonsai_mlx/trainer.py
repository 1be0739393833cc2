"""The MLX training loop: per-stage freezing, per-component learning rates on the one curve (core/runs.py), a
compiled step, accumulation, data-parallel, SIGINT-safe; checkpoints and metrics by the shared run protocol."""

from __future__ import annotations

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
from bonsai_mlx.core.runs import MetricsLog, RunDir, lr_factor
from bonsai_mlx.core.train_config import STAGES, TrainConfig, component_of
from bonsai_mlx.loss import ce_at, forward_states, to_mx
from bonsai_mlx.model import Pico


def setup_trainable(model: Pico, cfg: TrainConfig) -> None:
    """Freeze per stage: align = projector; instruct/distill = projector + LoRA; full = everything; the projector
    stays frozen with --projector-lr 0."""
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
    if not cfg.projector_trains:
        model.multi_modal_projector.freeze()
    # Trainable weights (and so AdamW's state) live in fp32 whatever the frozen dtype: pure fp16 + AdamW diverges.
    fp32 = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.trainable_parameters()) if v.dtype != mx.float32]
    if fp32:
        model.load_weights(fp32, strict=False)


def make_optimizer(cfg: TrainConfig, params: nn.Module) -> tuple[optim.Optimizer, list[tuple[optim.Optimizer, float]]]:
    """AdamW per learning-rate group (TrainConfig.component_lrs; groups with equal rates share one AdamW), and the
    (optimizer, peak lr) pairs whose rate the trainer sets each step from the one curve, `runs.lr_factor`."""
    present = {component_of(k) for k, _ in tree_flatten(params.trainable_parameters())} or {"lm"}
    lrs = cfg.component_lrs()
    rates = sorted({lrs[c] for c in present}, reverse=True)
    opts = [optim.AdamW(learning_rate=r, weight_decay=cfg.weight_decay) for r in rates]
    if len(opts) == 1:
        return opts[0], [(opts[0], rates[0])]
    filters = [
        (lambda path, _w, r=r: lrs[component_of(path)] == r) for r in rates[:-1]
    ]  # the last optimizer takes the rest
    return optim.MultiOptimizer(opts, filters), list(zip(opts, rates, strict=True))


def _bucket(n: int, size: int) -> int:
    return max(size, -(-n // size) * size)


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
        self.total_steps = cfg.total_steps(self.batches_per_epoch)
        self.step = 0
        self.out = Path(cfg.out)
        self.runs = RunDir.of(self.out)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.rank == 0)
        self.params_holder = nn.Module()
        self.params_holder.model = model
        if extra_params is not None:
            self.params_holder.extra = extra_params
        self.optimizer, self.lr_groups = make_optimizer(cfg, self.params_holder)
        self.loss_and_grad = nn.value_and_grad(self.params_holder, self._loss)
        # The compiled step (mlx-lm's pattern: model and RNG state captured). The distillation loss reads per-batch
        # Python structures (teacher units), so it runs eagerly.
        self.compiled = bool(cfg.compile) and extra_loss is None
        self._build_step()
        self.skipped: dict[str, str] = dict(train.bad)
        self.run_info: dict = {}  # saved in each checkpoint's state.json (e.g. that this is the embedded default)

    def _build_step(self) -> None:
        """(Re)build the compiled gradient function (forward + backward, the model and RNG state captured)."""
        self.optimizer.init(self.params_holder.trainable_parameters())  # its state must exist before tracing
        if not self.compiled:
            return
        # (value_and_grad puts its traced parameters into the model, so the model state is an output too)
        grad_state = [self.params_holder.state, mx.random.state]
        self._grad_c = mx.compile(
            nn.value_and_grad(self.params_holder, self._ce_loss), inputs=grad_state, outputs=grad_state
        )

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

    def _ce_loss(self, batch: dict, n: mx.array):
        """The compiled step's loss: positions padded to a bucket (weight 0), so a few shapes cover a run."""
        h, _ = forward_states(
            self.model,
            batch,
            self.cfg.train_vision or self.cfg.stage == "full",
            bool(self.cfg.grad_checkpoint),
            (),
            False,
        )
        ce = ce_at(self.model, h, batch["positions"], batch["targets"], weights=batch["weights"]) / n
        return ce, ce

    def _padded(self, b: Batch) -> dict:
        """`b` for the compiled step: ids right-padded to a multiple of 16 (causal attention never reads the pad),
        supervised positions to a multiple of 64 with weight 0; the image slots are counted here, in NumPy."""
        if b.pixel_values is not None:
            slots = int((b.input_ids == self.model.config.image_token_index).sum())
            want = len(b.pixel_values) * self.model.config.num_image_tokens
            if slots != want:
                raise ValueError(f"the batch has {slots} <image> tokens but its images give {want} features")
        B, L = b.input_ids.shape
        ids = np.full((B, _bucket(L, 16)), self.pad_id, np.int32)
        ids[:, :L] = b.input_ids
        # a flat index b * L + t moves to b * L' + t in the wider rows
        pos = (b.positions // L) * ids.shape[1] + b.positions % L
        k = _bucket(len(pos), 64)
        positions, targets, weights = np.zeros(k, np.int32), np.zeros(k, np.int32), np.zeros(k, np.float32)
        positions[: len(pos)], targets[: len(pos)], weights[: len(pos)] = pos, b.targets, 1.0
        return {
            "input_ids": mx.array(ids),
            "positions": mx.array(positions),
            "targets": mx.array(targets),
            "weights": mx.array(weights),
            "pixel_values": mx.array(b.pixel_values) if b.pixel_values is not None else None,
        }

    def _apply(self, grads, n: mx.array):
        grads = tree_map(lambda g: g / n, grads)
        if self.cfg.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, self.cfg.grad_clip)
        self.optimizer.update(self.params_holder, grads)

    def set_lr(self) -> float:
        """Set each group's rate for the step about to run (`self.step`, 0-based); returns the LM's."""
        f = lr_factor(self.step, self.cfg.warmup, self.total_steps)
        for opt, peak in self.lr_groups:
            opt.learning_rate = peak * f
        self.last_lr = self.cfg.lr * f
        return self.last_lr

    # -- data -------------------------------------------------------------------------------------
    def micro_batches(self, start_micro: int):
        micro = start_micro
        while True:
            yield collate([self.train.examples[j] for j in self.schedule[micro]], self.proc, self.pad_id)
            micro += 1

    @property
    def pad_id(self) -> int:
        return self.proc.pad_id

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
            if self.compiled:
                (loss, parts), grads = self._grad_c(self._padded(b), mx.array(float(max(len(b.targets), 1))))
            else:
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
        self.set_lr()
        if n == 0:
            self.step += 1  # a step whose micro-batches were all skipped still consumes them (exact resume)
            return float("nan"), 0, aux
        self._apply(grads_sum, mx.array(float(n)))  # (AdamW is a few elementwise ops: compiling it gained nothing)
        mx.eval(self.params_holder.parameters(), self.optimizer.state)
        self.step += 1
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
        self._build_step()
        self.metrics.rewind(self.step)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, log: Callable[[str], None] = print) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
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
                    "lr": self.last_lr,
                    "tokens_per_s": t_tok / dt,
                    "peak_gb": mx.get_peak_memory() / 1e9,
                    **aux,
                }
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.3f}", tok_s=f"{t_tok / dt:.0f}", peak=f"{last['peak_gb']:.2f}GB", refresh=False
                )
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.metrics.write(last)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.rank == 0:
                    ev = {"step": self.step, "eval_loss": self.eval_loss()}  # (puts the model in eval mode)
                    if self.on_eval:
                        ev.update(self.on_eval(self))
                    bar.write(
                        "eval "
                        + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items())
                    )
                    self.metrics.write(ev)
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
