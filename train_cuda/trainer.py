"""PyTorch training for `train_cuda.sft` and `train_cuda.distill` (same data and outputs as bonsai_mlx.train)."""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bonsai_mlx.core.batching import BatchSchedule, collate, prefetch
from bonsai_mlx.core.cli import add_options, given
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import Dataset, read_records
from bonsai_mlx.core.runs import MetricsLog, RunDir, check_resume, lr_factor, read_state
from bonsai_mlx.core.train_config import TrainConfig, component_of

# What the CUDA trainer does not take: MLX-only options (it always trains projector + LoRA on an NF4 LM under CUDA)
MLX_ONLY = (
    "stage",
    "quantize_base",
    "train_vision",
    "compile",
    "eval_data",
    "eval_every",
    "on_bad_sample",
    "vision_lr",
)
DISTILL_ONLY = ("teacher_cache", "alpha", "alpha_end", "feat_loss", "layer_map", "kl", "kl_mode", "kl_weight")
DISTILL_ONLY += ("kl_temperature", "teacher", "teacher_4bit", "teacher_layers", "logits_topk")


def parser(prog: str, doc: str | None, distill: bool) -> argparse.ArgumentParser:
    """`train_cuda.sft|distill`'s flags: TrainConfig's fields (one source of defaults and help), plus --resume."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, TrainConfig, suppress=True, exclude=MLX_ONLY + (() if distill else DISTILL_ONLY))
    ap.add_argument("--resume", action="store_true", help="continue exactly from --out's latest checkpoint")
    return ap


def config_from_args(args: argparse.Namespace, distill: bool) -> TrainConfig:
    """The run's TrainConfig: TrainConfig's defaults (or, with --resume, the checkpoint's options) under the flags
    given. The resume policy is the MLX trainer's: an option that differs from the checkpoint's is refused."""
    flags = given(TrainConfig, args)
    base: dict = {"stage": "distill" if distill else "instruct"}
    if args.resume:
        out = Path(flags.get("out", TrainConfig.out))
        ck = RunDir.of(out).latest()
        if ck is None:
            raise InputNotFound(f"{out}: no checkpoints/latest to resume from (--resume continues a run in --out)")
        base = read_state(ck)["config"]
        check_resume(ck, base, flags)
    cfg = TrainConfig.from_dict({**base, **flags})
    for need in ("model", "data"):
        if not getattr(cfg, need):
            raise UserError(f"{'--student' if need == 'model' else '--data'} is required")
    if distill and bool(cfg.teacher) == bool(cfg.teacher_cache):
        raise UserError("give one of --teacher (online, on the GPU) or --teacher-cache (made by train_cuda.extract)")
    if cfg.dtype == "float16":
        raise UserError("--dtype float16 is not supported on the CUDA side (bfloat16 has float32's range)")
    return cfg


def train(cfg: TrainConfig, distill: bool, resume: bool = False) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    from train_cuda.losses import Aligners, StudentStep
    from train_cuda.student import load_student

    set_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype is None and cuda)
    # bf16 autocast around fp32 trainables: the frozen base is bf16 (NF4 LM) and attention gets bf16 inputs
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if bf16 else "no")
    scfg = PicoConfig.load(cfg.model)
    proc = Processor(cfg.model, scfg)
    records = read_records(cfg.data)
    ds = Dataset.build(records, proc, cfg.image_root, cfg.max_length)
    acc.print(f"train data: {ds.summary()}")
    aligners = cache = plan = online = None
    if distill:
        from bonsai_mlx.core.distill_targets import cache_layer_map, open_teacher_cache, plan_logits

        if cfg.teacher:  # online: the teacher's no-grad forward inside each step, through extract's target path
            from bonsai_mlx.core.records import record_ids
            from train_cuda.online_teacher import OnlineTeacher

            layers = [int(x) for x in cfg.teacher_layers.split(",") if x.strip()]
            online = OnlineTeacher(
                cfg.teacher, proc, layers, cfg.image_root, cfg.logits_topk, cfg.teacher_4bit, device=str(acc.device)
            )
            by_id = dict(zip(record_ids(records), records, strict=True))
            # what the setup reads (layer map, logit plan) from a sample of the data, as from a cache
            sample = [e.id for e in ds.examples[:64]]
            cache = online.view([by_id[i] for i in sample], sample)
            acc.print(
                f"distill: online teacher {cfg.teacher} (layers {layers}{', NF4 LM' if cfg.teacher_4bit else ''})"
            )
        else:
            cache, ds.examples = open_teacher_cache(cfg, proc, ds.examples, acc.print)
        if cfg.kl or cfg.kl_mode != "auto":  # naming a mode asks for the logit term too
            plan = plan_logits(cache, proc.tokenizer, cfg.kl_mode)
            acc.print("distill: " + plan.describe())
        pairs = cache_layer_map(cfg.layer_map, cache, scfg.text.num_hidden_layers, scfg.vision.grid)
        acc.print("layer map (teacher:student): " + ",".join(f"{t}:{s}" for t, s in pairs))
    targets = tuple(t for t in cfg.lora_targets.split(",") if t)
    set_seed(cfg.seed)  # LoRA and aligner init do not depend on what loaded before (an online teacher)
    model, notes = load_student(
        cfg.model,
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lora_dropout,
        targets,
        grad_checkpoint=cfg.checkpointing(cuda),
        bf16=bf16,
        train_projector=cfg.projector_trains,
    )
    acc.print("student: " + "; ".join(notes))
    if distill:
        aligners = Aligners(pairs, scfg.text.hidden_size, cache.manifest["hidden_size"])
    step_module = StudentStep(model, aligners, cfg if distill else None, proc.image_token_id, cache, plan)
    step_module.to(acc.device)
    schedule = BatchSchedule(
        [len(e.ids) for e in ds.examples],
        cfg.batch_size,
        cfg.seed,
        cfg.group_by_length,
        acc.process_index,
        acc.num_processes,
    )
    total = cfg.total_steps(schedule.per_epoch)
    opt = torch.optim.AdamW(param_groups(step_module, cfg), weight_decay=cfg.weight_decay)
    # the one curve (core/runs.py) on every group's own peak rate; not prepared: accelerate would step it once per
    # process, here it steps once per optimizer step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, cfg.warmup, total))
    # the forward runs through the prepared (DDP-wrapped) module, so gradients all-reduce across ranks
    wrapped, opt = acc.prepare(step_module, opt)
    params = [p for p in step_module.parameters() if p.requires_grad]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    step, micro = 0, 0
    if resume:
        step, micro = load_checkpoint(out, acc, acc.unwrap_model(wrapped), opt, sched)
        metrics.rewind(step)
        acc.print(f"resumed at step {step}")
    bar = tqdm(total=total, initial=step, desc="distill" if distill else "sft", disable=not acc.is_main_process)
    last, t0, toks = {}, time.perf_counter(), 0
    wrapped.train()

    def batches(start: int):
        k = start
        while True:
            yield k, collate([ds.examples[j] for j in schedule[k]], proc, proc.pad_id)
            k += 1

    stream = prefetch(batches(micro))  # image decoding for the next batches overlaps this one's compute
    while step < total:
        k, b = next(stream)
        micro = k + 1
        if not b.ids:
            continue
        kw = {}
        if online is not None:  # the teacher's targets for this micro-batch (no grad; its own rank's device)
            kw["cache"] = online.view([by_id[i] for i in b.ids], b.ids)
        with acc.accumulate(wrapped):
            parts = wrapped(**step_inputs(b, acc.device), frac=step / max(1, total - 1), **kw)
            acc.backward(parts["loss"])
            if acc.sync_gradients and cfg.grad_clip:
                acc.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad()
        toks += b.n_tokens
        if acc.sync_gradients:
            lr = cfg.lr * lr_factor(step, cfg.warmup, total)  # the rate this step used
            sched.step()
            step += 1
            last = {"step": step, **{k: v.item() for k, v in parts.items()}, "lr": lr}
            last["tokens_per_s"] = toks / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == total:
                metrics.write(last)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(out, f"step-{step:06d}", acc, wrapped, opt, sched, step, micro, cfg)
    bar.close()
    save_checkpoint(out, "final", acc, wrapped, opt, sched, step, micro, cfg)
    final = out / "checkpoints" / "final"
    acc.print(f"adapter + projector: {final}  (merge: python -m bonsai_mlx.convert fuse {cfg.model} {out} OUT)")
    return last


def param_groups(step_module, cfg: TrainConfig) -> list[dict]:
    """The trainables by learning-rate group (TrainConfig.component_lrs): projector; LoRA and aligners."""
    lrs = cfg.component_lrs()
    groups: dict[str, list] = {}
    for n, p in step_module.named_parameters():
        if p.requires_grad:
            groups.setdefault(component_of(n), []).append(p)
    return [{"params": ps, "lr": lrs[c], "name": c} for c, ps in sorted(groups.items())]


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


def save_checkpoint(out: Path, name: str, acc, wrapped, opt, sched, step: int, micro: int, cfg: TrainConfig) -> Path:
    """`out/checkpoints/<name>` by the shared run protocol (core/runs.py): the adapter and projector (what
    `convert fuse` reads) and everything an exact resume needs: trainables incl. aligners, optimizer and
    scheduler state, step, micro-batch and every rank's RNG states."""
    import torch
    from safetensors.torch import save_file

    from train_cuda.student import projector_state

    runs = RunDir.of(out)
    acc.wait_for_everyone()
    if acc.is_main_process:
        runs.begin(name)
    acc.wait_for_everyone()
    tmp = runs.tmp(name)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(_plain(rng), tmp / f"rng-{acc.process_index}.pt")
    inner = acc.unwrap_model(wrapped)
    sums = acc.gather(checksum(inner).to(acc.device)).reshape(acc.num_processes, -1).cpu().tolist()
    if any(x != sums[0] for x in sums):
        raise RuntimeError(f"ranks hold different trainables at step {step} ({sums}): gradients were not all-reduced")
    acc.wait_for_everyone()  # every rank's RNG file is in before state.json marks the checkpoint complete
    if acc.is_main_process:
        inner.model.save_pretrained(str(tmp))
        save_file(projector_state(inner.model), str(tmp / "projector.safetensors"))
        save_file(trainable_state(inner), str(tmp / "trainable.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        state = {"step": step, "micro": micro, "scheduler": sched.state_dict(), "config": asdict(cfg)}
        state.update(time=time.time(), rank_checksums=sums)
        runs.commit(name, state)
    acc.wait_for_everyone()
    return out / "checkpoints" / name


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


def load_checkpoint(out: Path, acc, step_module, opt, sched) -> tuple[int, int]:
    """Restore a run from `out/checkpoints/latest`: trainables, optimizer, scheduler, RNG; (step, micro)."""
    import torch
    from safetensors.torch import load_file

    ck = RunDir.of(out).latest()
    if ck is None:
        raise InputNotFound(f"{out}: no checkpoints/latest to resume from (--resume continues a run in --out)")
    state = read_state(ck)
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
