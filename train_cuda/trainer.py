"""PyTorch training for `train_cuda.sft` and `train_cuda.distill` (same data and outputs as bonsai_mlx.train)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bonsai_mlx.core.align import FEAT_LOSSES
from bonsai_mlx.core.batching import BatchSchedule, collate
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.io import atomic_write_text
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import Dataset, read_records
from bonsai_mlx.core.train_config import TrainConfig


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
    ap.add_argument("--kl", action="store_true", help="add logit KL (shared vocabulary; cache made with --kl-topk)")
    ap.add_argument("--kl-weight", type=float, default=d.kl_weight)
    ap.add_argument("--kl-temperature", type=float, default=d.kl_temperature)


def train(a, distill: bool) -> dict:
    import torch
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from train_cuda.losses import Aligners, ce_at, distill_loss, feature_loss, kl_loss
    from train_cuda.student import load_student, projector_state

    torch.manual_seed(a.seed)
    acc = Accelerator(gradient_accumulation_steps=a.grad_accum)
    scfg = PicoConfig.load(a.student)
    proc = Processor(a.student, scfg)
    model, notes = load_student(a.student, a.lora_rank, a.lora_alpha, a.lora_dropout, grad_checkpoint=a.grad_checkpoint)
    acc.print("student: " + "; ".join(notes))
    ds = Dataset.build(read_records(a.data), proc, a.image_root, a.max_length)
    acc.print(f"train data: {ds.summary()}")
    params = [p for p in model.parameters() if p.requires_grad]
    aligners = cache = None
    if distill:
        from bonsai_mlx.core.distill_targets import gather_targets, parse_layer_map
        from bonsai_mlx.core.teacher_cache import CacheReader

        cache = CacheReader(a.teacher_cache, proc.tokenizer)
        if a.kl:
            from bonsai_mlx.core.distill_targets import check_kl

            check_kl(cache, proc.tokenizer)
        ds.examples = [e for e in ds.examples if e.id in cache]
        pairs = parse_layer_map(a.layer_map, cache.layers, scfg.text.num_hidden_layers)
        aligners = Aligners(pairs, scfg.text.hidden_size, cache.manifest["hidden_size"]).to(acc.device)
        params += list(aligners.parameters())
    schedule = BatchSchedule(
        [len(e.ids) for e in ds.examples], a.batch_size, a.seed, True, acc.process_index, acc.num_processes
    )
    per_epoch = schedule.per_epoch
    total = a.max_steps or max(1, math.ceil(per_epoch * a.epochs / a.grad_accum))
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(a.warmup, total - 1), total)
    model, opt, sched = acc.prepare(model, opt, sched)
    base = acc.unwrap_model(model).base_model.model  # LlavaForConditionalGeneration
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pad = proc.tokenizer.pad_token_id or 0
    keep = sorted({s for _, s in aligners.pairs}) if aligners else []
    bar = tqdm(total=total, desc="distill" if distill else "sft", disable=not acc.is_main_process)
    step, micro, last, t0, toks, kl = 0, 0, {}, time.perf_counter(), 0, None
    model.train()
    while step < total:
        b = collate([ds.examples[j] for j in schedule[micro]], proc, pad)
        micro += 1
        if not b.ids:
            continue
        with acc.accumulate(model):
            kw = {"pixel_values": torch.tensor(b.pixel_values, device=acc.device)} if b.pixel_values is not None else {}
            o = base.model(
                input_ids=torch.tensor(b.input_ids, device=acc.device, dtype=torch.long),
                output_hidden_states=bool(keep),
                **kw,
            )
            h = o.last_hidden_state
            ce = ce_at(
                base.lm_head,
                h,
                torch.tensor(b.positions, device=acc.device, dtype=torch.long),
                torch.tensor(b.targets, device=acc.device, dtype=torch.long),
            )
            loss, feat = ce, None
            if distill:
                d = {
                    k: torch.tensor(v, device=acc.device)
                    for k, v in gather_targets(
                        cache, b, proc.image_token_id, [t for t, _ in aligners.pairs], a.kl
                    ).items()
                }
                for k in ("text_pos", "image_pos", "kl_pos"):
                    if k in d:
                        d[k] = d[k].long()
                states = {s: o.hidden_states[s] for s in keep}
                feat = feature_loss(aligners, states, d, a.feat_loss)
                loss = distill_loss(ce, feat, a.alpha, a.alpha_end, step / max(1, total - 1))
                if a.kl:
                    hk = h.reshape(-1, h.shape[-1])[d["kl_pos"]]
                    kl = kl_loss(base.lm_head(hk), d["kl_logits"], d["kl_ids"], a.kl_temperature)
                    loss = loss + a.kl_weight * kl
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        toks += b.n_tokens
        if acc.sync_gradients:
            step += 1
            last = {
                "step": step,
                "loss": loss.item(),
                "ce": ce.item(),
                "tokens_per_s": toks / (time.perf_counter() - t0),
            }
            if feat is not None:
                last["feat"] = feat.item()
            if distill and a.kl:
                last["kl"] = kl.item()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
            if acc.is_main_process and (step % a.log_every == 0 or step == total):
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
    bar.close()
    if acc.is_main_process:
        final = out / "checkpoints" / "final"
        acc.unwrap_model(model).save_pretrained(str(final))
        save_file(projector_state(acc.unwrap_model(model)), str(final / "projector.safetensors"))
        atomic_write_text(out / "checkpoints" / "latest", "final\n")
        acc.print(f"adapter + projector: {final}  (merge: python -m convert fuse {a.student} {final} OUT)")
    return last


def mean_of(rows: list[dict], key: str, n: int) -> float:
    return float(np.mean([r[key] for r in rows[:n]]))
