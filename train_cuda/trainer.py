"""PyTorch training for `train_cuda.sft` and `train_cuda.distill` (same data and outputs as bonsai_mlx.train)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bonsai_mlx.core.align import FEAT_LOSSES
from bonsai_mlx.core.batching import BatchSchedule, collate, prefetch
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.io import atomic_write_text
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import Dataset, read_records
from bonsai_mlx.core.train_config import TrainConfig
from bonsai_mlx.core.vocab_map import KL_MODES


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options both `sft` and `distill` take; defaults come from `TrainConfig`, as in bonsai_mlx.train."""
    d = TrainConfig()
    ap.add_argument("--student", required=True, help="the Pico directory to train (HF Llava layout)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-root")
    ap.add_argument("--out", default="runs/cuda")
    ap.add_argument("--lora-rank", type=int, default=d.lora_rank)
    ap.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    ap.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--epochs", type=float, default=d.epochs)
    ap.add_argument("--max-length", type=int, default=d.max_length)
    # On a GPU the memory matters more than the 20-30% time: checkpointing is on unless turned off.
    ap.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_false")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--log-every", type=int, default=d.log_every)
    ap.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only the end)")
    ap.add_argument("--resume", action="store_true", help="continue exactly from --out's latest checkpoint")
    ap.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 compute (fp32 trainables) on CUDA, fp32 on the CPU",
    )


def add_distill_args(ap: argparse.ArgumentParser) -> None:
    """The distillation options, with `TrainConfig`'s defaults."""
    d = TrainConfig()
    ap.add_argument("--teacher-cache", required=True, help="made by python -m train_cuda.extract")
    ap.add_argument("--alpha", type=float, default=d.alpha, help="weight of the feature loss")
    ap.add_argument("--alpha-end", type=float, default=d.alpha_end, help="alpha decays linearly to this")
    ap.add_argument(
        "--feat-loss", choices=FEAT_LOSSES, default=d.feat_loss, help=f"distance to the teacher states ({d.feat_loss})"
    )
    ap.add_argument("--layer-map", help="teacher:student layer pairs, e.g. -1:-1,16:12 (default: relative depth)")
    ap.add_argument(
        "--kl",
        action="store_true",
        help="add a logit loss at aligned text units (cache made with --logits-topk); across vocabularies it picks "
        "a cross-tokenizer --kl-mode and says which",
    )
    ap.add_argument(
        "--kl-mode",
        choices=KL_MODES,
        default=d.kl_mode,
        help="same-vocab (KL on token ids), uld (sorted-probability L1, any tokenizers), shared-vocab (KL over "
        "tokens with equal strings), auto (pick from the cache); a mode other than auto implies --kl",
    )
    ap.add_argument("--kl-weight", type=float, default=d.kl_weight)
    ap.add_argument("--kl-temperature", type=float, default=d.kl_temperature)


# CLI options a resumed run may change; any other difference would make the continuation a different run
RESUME_FREE = {"out", "resume", "log_every", "save_every"}


def train(a, distill: bool) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from train_cuda.losses import Aligners, StudentStep
    from train_cuda.student import load_student

    set_seed(a.seed)
    cuda = torch.cuda.is_available()
    bf16 = a.precision == "bf16" or (a.precision == "auto" and cuda)
    # bf16 autocast around fp32 trainables: the frozen base is bf16 (NF4 LM) and attention gets bf16 inputs
    acc = Accelerator(gradient_accumulation_steps=a.grad_accum, mixed_precision="bf16" if bf16 else "no")
    scfg = PicoConfig.load(a.student)
    proc = Processor(a.student, scfg)
    model, notes = load_student(
        a.student, a.lora_rank, a.lora_alpha, a.lora_dropout, grad_checkpoint=a.grad_checkpoint, bf16=bf16
    )
    acc.print("student: " + "; ".join(notes))
    ds = Dataset.build(read_records(a.data), proc, a.image_root, a.max_length)
    acc.print(f"train data: {ds.summary()}")
    aligners = cache = plan = None
    if distill:
        from bonsai_mlx.core.distill_targets import cache_layer_map
        from bonsai_mlx.core.teacher_cache import CacheReader

        cache = CacheReader(a.teacher_cache, proc.tokenizer, proc.chat_template)
        if a.kl or a.kl_mode != "auto":  # naming a mode asks for the logit term too
            from bonsai_mlx.core.distill_targets import plan_logits

            plan = plan_logits(cache, proc.tokenizer, a.kl_mode)
            acc.print("distill: " + plan.describe())
        missing = [e.id for e in ds.examples if e.id not in cache]
        if missing:
            acc.print(f"distill: {len(missing)} training samples are not in the cache (e.g. {missing[0]}); skipped")
        ds.examples = [e for e in ds.examples if e.id in cache]
        pairs = cache_layer_map(a.layer_map, cache, scfg.text.num_hidden_layers, scfg.vision.grid)
        acc.print("layer map (teacher:student): " + ",".join(f"{t}:{s}" for t, s in pairs))
        aligners = Aligners(pairs, scfg.text.hidden_size, cache.manifest["hidden_size"])
    step_module = StudentStep(model, aligners, a if distill else None, proc.image_token_id, cache, plan)
    step_module.to(acc.device)
    params = [p for p in step_module.parameters() if p.requires_grad]
    schedule = BatchSchedule(
        [len(e.ids) for e in ds.examples], a.batch_size, a.seed, True, acc.process_index, acc.num_processes
    )
    total = a.max_steps or max(1, math.ceil(schedule.per_epoch * a.epochs / a.grad_accum))
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    # not prepared: accelerate would step it once per process; here it steps once per optimizer step
    sched = get_cosine_schedule_with_warmup(opt, min(a.warmup, total - 1), total)
    # the forward runs through the prepared (DDP-wrapped) module, so gradients all-reduce across ranks
    wrapped, opt = acc.prepare(step_module, opt)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    step, micro = 0, 0
    if a.resume:
        step, micro = load_checkpoint(out, acc, acc.unwrap_model(wrapped), opt, sched, a)
        acc.print(f"resumed at step {step}")
    pad = proc.tokenizer.pad_token_id or 0
    bar = tqdm(total=total, initial=step, desc="distill" if distill else "sft", disable=not acc.is_main_process)
    last, t0, toks = {}, time.perf_counter(), 0
    wrapped.train()

    def batches(start: int):
        k = start
        while True:
            yield k, collate([ds.examples[j] for j in schedule[k]], proc, pad)
            k += 1

    stream = prefetch(batches(micro))  # image decoding for the next batches overlaps this one's compute
    while step < total:
        k, b = next(stream)
        micro = k + 1
        if not b.ids:
            continue
        with acc.accumulate(wrapped):
            parts = wrapped(**step_inputs(b, acc.device), frac=step / max(1, total - 1))
            acc.backward(parts["loss"])
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
        toks += b.n_tokens
        if acc.sync_gradients:
            sched.step()
            step += 1
            last = {"step": step, **{k: v.item() for k, v in parts.items()}}
            last["lr"] = sched.get_last_lr()[0]
            last["tokens_per_s"] = toks / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
            if acc.is_main_process and (step % a.log_every == 0 or step == total):
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
            if a.save_every and step % a.save_every == 0 and step < total:
                save_checkpoint(out, f"step-{step:06d}", acc, wrapped, opt, sched, step, micro, a)
    bar.close()
    save_checkpoint(out, "final", acc, wrapped, opt, sched, step, micro, a)
    final = out / "checkpoints" / "final"
    acc.print(f"adapter + projector: {final}  (merge: python -m convert fuse {a.student} {out} OUT)")
    return last


def step_inputs(b, device) -> dict:
    """One collated batch as the tensors `StudentStep.forward` takes, on `device`."""
    import torch

    kw = {
        "input_ids": torch.tensor(b.input_ids, device=device, dtype=torch.long),
        "positions": torch.tensor(b.positions, device=device, dtype=torch.long),
        "targets": torch.tensor(b.targets, device=device, dtype=torch.long),
        "batch": b,
    }
    if b.pixel_values is not None:
        kw["pixel_values"] = torch.tensor(b.pixel_values, device=device)
    return kw


def trainable_state(step_module) -> dict:
    """{name: fp32 tensor} of the trainables (LoRA, projector, aligners), for checkpoints."""
    return {n: p.detach().float().cpu().contiguous() for n, p in step_module.named_parameters() if p.requires_grad}


def checksum(step_module):
    """Two float64 sums over every trainable (plain and position-weighted): equal on all ranks of a run."""
    import torch

    flat = torch.cat([p.detach().double().flatten().cpu() for p in step_module.parameters() if p.requires_grad])
    return torch.stack([flat.sum(), (flat * torch.arange(1, len(flat) + 1, dtype=torch.float64)).sum()])


def save_checkpoint(out: Path, name: str, acc, wrapped, opt, sched, step: int, micro: int, a) -> Path | None:
    """`out/checkpoints/<name>` (via a temp dir; `latest` points at it): the adapter and projector (what
    `convert fuse` reads) and everything an exact resume needs: trainables incl. aligners, optimizer and
    scheduler state, step, micro-batch and every rank's RNG states."""
    import os
    import random
    import shutil

    import torch
    from safetensors.torch import save_file

    from train_cuda.student import projector_state

    ck = out / "checkpoints" / name
    tmp = ck.with_name(f".{name}.tmp")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(_plain(rng), tmp / f"rng-{acc.process_index}.pt")
    inner = acc.unwrap_model(wrapped)
    sums = acc.gather(checksum(inner).to(acc.device)).reshape(acc.num_processes, -1).cpu().tolist()
    if any(x != sums[0] for x in sums):
        raise RuntimeError(f"ranks hold different trainables at step {step} ({sums}): gradients were not all-reduced")
    if acc.is_main_process:
        inner.model.save_pretrained(str(tmp))
        save_file(projector_state(inner.model), str(tmp / "projector.safetensors"))
        save_file(trainable_state(inner), str(tmp / "trainable.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        state = {"step": step, "micro": micro, "scheduler": sched.state_dict(), "args": vars(a), "time": time.time()}
        state["rank_checksums"] = sums
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=2, default=str))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if ck.exists():
            shutil.rmtree(ck)
        os.replace(tmp, ck)
        atomic_write_text(out / "checkpoints" / "latest", name + "\n")
    acc.wait_for_everyone()
    return ck


def _plain(rng: dict) -> dict:
    """RNG states as tensors and lists only (loadable with torch.load(weights_only=True))."""
    import torch

    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    version, state, gauss_next = rng["python"]
    out = {
        "torch": rng["torch"],
        "numpy": [kind, torch.tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [int(version), list(state), gauss_next],
    }
    if "cuda" in rng:
        out["cuda"] = rng["cuda"]
    return out


def load_checkpoint(out: Path, acc, step_module, opt, sched, a) -> tuple[int, int]:
    """Restore a run from `out/checkpoints/latest`: trainables, optimizer, scheduler, RNG; (step, micro)."""
    import random

    import torch
    from safetensors.torch import load_file

    latest = out / "checkpoints" / "latest"
    if not latest.is_file():
        raise InputNotFound(f"{out}: no checkpoints/latest to resume from (--resume continues a run in --out)")
    ck = out / "checkpoints" / latest.read_text().strip()
    state = json.loads((ck / "state.json").read_text())
    now = json.loads(json.dumps(vars(a), default=str))
    diff = [k for k in now if k not in RESUME_FREE and state["args"].get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{ck}: --{k.replace('_', '-')} was {state['args'].get(k)!r}, now {now[k]!r}; resume as run")
    saved = load_file(str(ck / "trainable.safetensors"))
    named = {n: p for n, p in step_module.named_parameters() if p.requires_grad}
    if set(saved) != set(named):
        raise UserError(f"{ck}: trainables differ from this setup's (e.g. {sorted(set(saved) ^ set(named))[0]})")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(saved[n].to(p.device, p.dtype))
    opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True))
    sched.load_state_dict(state["scheduler"])
    rng_path = ck / f"rng-{acc.process_index}.pt"
    if rng_path.is_file():
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, st, gauss_next = rng["python"]
        random.setstate((version, tuple(st), gauss_next))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"]), int(state["micro"])
