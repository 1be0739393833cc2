"""The online teacher in `train_cuda.bench`: a LLaVA-1.5-7B-shaped teacher (random weights, its LM in NF4 when
bitsandbytes is installed) run inside every distillation step through `OnlineTeacher`, timed against the parts
the issue's target adds up (the sft step with checkpointing + the teacher's forward alone on the same batch)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def bench_teacher(model, t: dict):
    """The bench's teacher model (`bench.teacher_model`) as a `Teacher` (no tokenizer needed: plans are made from
    token ids directly)."""
    import torch
    from transformers import CLIPImageProcessor

    from train_cuda.teacher import Teacher, image_tokens

    n_img, grid, offset = image_tokens(model)
    ip = CLIPImageProcessor(size={"shortest_edge": t["image_size"]},
                            crop_size={"height": t["image_size"], "width": t["image_size"]})  # fmt: skip
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = argparse.Namespace(pad_token_id=0)
    teacher = Teacher(model, tok, ip, "", model.config.image_token_index, n_img, grid, dev, offset)
    teacher.config = model.config
    return teacher, t


def nf4_in_place(model) -> str:
    """Quantise the teacher's LM linears to NF4 in place (bitsandbytes `Linear4bit`, computing in the model's
    dtype; the vision tower, projector and LM head stay as they are, as `precision.nf4_config` loads a real
    teacher). Returns the teacher's precision: "nf4", or its dtype and why not (no bitsandbytes, or it failed)."""
    import torch

    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    try:
        import bitsandbytes as bnb
    except ImportError:
        return f"{dtype} (no bitsandbytes)"
    lm = model.model.language_model
    try:
        for mod in list(lm.modules()):
            for child, lin in list(mod.named_children()):
                if type(lin) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=param.dtype, quant_type="nf4", device="meta")  # fmt: skip
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=q)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(mod, child, q.to(param.device))  # quantised on the way to the device
    except Exception as e:  # report it and measure the teacher as it is (some linears may be NF4 already)
        return f"{dtype}, NF4 failed part way ({type(e).__name__}: {str(e)[:200]})"
    if param.device.type == "cuda":
        torch.cuda.empty_cache()
    return "nf4"


def batch_plans(cfg, teacher, pc, root: Path, answer: list[int]):
    """The student batch's samples as the teacher sees them: BOS, its image tokens, the text (as many tokens as
    the student's), the answer's units aligned to the student's `answer` positions; one 640x480 JPEG each."""
    from PIL import Image

    from train_cuda.targets import Plan

    rng = np.random.default_rng(1)
    w, h = cfg.image_size
    (root / "online-img").mkdir(parents=True, exist_ok=True)
    n_text = cfg.seq - pc.num_image_tokens - 1
    plans = []
    for i in range(cfg.batch):
        path = root / "online-img" / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path, quality=90)
        text = [int(x) for x in rng.integers(10, teacher.model.config.text_config.vocab_size - 2, size=n_text)]
        t_ids = [1] + [teacher.image_token_id] * teacher.num_image_tokens + text
        t_answer = range(len(t_ids) - len(answer) - 1, len(t_ids) - 1)
        plans.append(Plan(f"b{i}", t_ids, list(zip(t_answer, answer, strict=True)), str(path), []))
    return plans


def forward_bench(cfg, teacher, plans, pixels, layers: list[int]) -> dict:
    """Seconds of the teacher's forward alone on the batch (what online distillation adds at the least)."""
    import torch

    px = np.stack([pixels[p.sid][0] for p in plans])
    cuda = torch.cuda.is_available()
    for i in range(cfg.warmup + cfg.steps):
        if i == cfg.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        teacher.forward([p.t_ids for p in plans], px, layers)
    if cuda:
        torch.cuda.synchronize()
    return {"step_s": (time.perf_counter() - t0) / cfg.steps, "tokens": len(plans[0].t_ids)}


def online_bench(cfg, model_dir: Path, teacher, plans, pixels, layers: list[int], quant: str, train_bench) -> dict:
    """The distillation step with the teacher online: each step `OnlineTeacher.targets_for_plans` (a no-grad
    teacher forward, pooling, the targets as stored) refreshes the step's targets, then the student trains
    (`train_bench`: the bench's step loop, passed in)."""
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.teacher_cache import MemoryCache
    from train_cuda.online_teacher import OnlineTeacher

    pc = PicoConfig.load(model_dir)
    width = teacher.model.config.text_config.hidden_size
    online = OnlineTeacher.wrap(teacher, layers, pc.vision.grid)
    manifest = {"layers": layers, "hidden_size": width}

    def refresh(step, batch):
        step.cache = MemoryCache(manifest, online.targets_for_plans(plans, pixels))

    res = train_bench(cfg, model_dir, distill=True, checkpointing=True, width=width, per_step=refresh)
    res["teacher"] = quant
    res["note"] = "teacher images decoded before the timing (as a data loader's prefetch thread would)"
    return res
