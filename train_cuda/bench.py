"""python -m train_cuda.bench: the PyTorch side's speed and memory targets in one command.

On a CUDA GPU (the figures that matter): the full-size Pico (SigLIP-B/16-224 + Qwen2.5-0.5B, random
weights, LM in NF4, bf16 compute) trained at batch 8 x 512 tokens with one 224px image per sample:

- sft tok/s and peak GPU memory, without and with gradient checkpointing;
- distill tok/s and peak memory (checkpointing; two matched layers against 4096-wide teacher targets);
- extraction samples/s for a LLaVA-1.5-7B-shaped teacher (CLIP ViT-L/14-336 + Llama-7B, random bf16
  weights) at batch 16 on 640x480 images, image decoding and pooling included.

Without a GPU it runs the same code at toy sizes on the CPU (a smoke test: those numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class BenchConfig:
    batch: int = 8
    seq: int = 512
    steps: int = 10
    warmup: int = 2
    extract_batch: int = 16
    extract_samples: int = 64
    text_units: int = 64  # aligned answer tokens per sample (distill targets, extraction units)
    student: dict = field(default_factory=dict)  # PicoConfig overrides (empty: full size)
    teacher: dict = field(default_factory=dict)  # teacher size overrides (empty: LLaVA-1.5-7B shape)
    image_size: tuple[int, int] = (640, 480)


def tiny() -> BenchConfig:
    """CPU smoke sizes: the same code paths, in seconds."""
    return BenchConfig(
        batch=2,
        seq=48,
        steps=2,
        warmup=1,
        extract_batch=2,
        extract_samples=4,
        text_units=8,
        student={"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8),
                 "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)},
        teacher=dict(v_hidden=32, v_layers=2, v_heads=2, image_size=48, patch_size=8, hidden=48, layers=4, heads=4,
                     vocab=300),
        image_size=(64, 48),
    )  # fmt: skip


def pico_dir(cfg: BenchConfig, root: Path) -> Path:
    """A random Pico saved with save_pretrained (config + weights are all `load_student` reads)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from bonsai_mlx.core.config import PicoConfig, TextConfig, VisionConfig

    pc = PicoConfig()
    if cfg.student:
        pc = PicoConfig(
            vision=VisionConfig(**cfg.student["vision"]), text=TextConfig(**cfg.student["text"]), image_token_index=5
        )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(**pc.to_dict())).to(
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    out = root / "pico"
    model.save_pretrained(str(out))
    return out


class _SyntheticCache:
    """What `gather_targets` reads, in memory: every sample's teacher targets at `units` text positions."""

    def __init__(self, units: list[int], n_image: int, layers: list[int], width: int):
        from bonsai_mlx.core.teacher_cache import Entry

        rng = np.random.default_rng(0)
        self.manifest = {"hidden_size": width, "kl_topk": 0}
        t = {L: rng.normal(size=(len(units), width)).astype(np.float16) for L in layers}
        im = {L: rng.normal(size=(n_image, width)).astype(np.float16) for L in layers}
        self.entry = Entry(units, units, t, im)

    def get(self, sid: str):
        return self.entry


def train_bench(cfg: BenchConfig, model_dir: Path, distill: bool, checkpointing: bool) -> dict:
    """tok/s and peak memory of the trainers' step (StudentStep under the trainers' precision)."""
    import contextlib

    import torch

    from bonsai_mlx.core.batching import Batch
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.train_config import TrainConfig
    from train_cuda.losses import Aligners, StudentStep
    from train_cuda.student import load_student

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    pc = PicoConfig.load(model_dir)
    model, _ = load_student(str(model_dir), rank=16, dropout=0.0, grad_checkpoint=checkpointing)
    n_img = pc.num_image_tokens
    B, L = cfg.batch, cfg.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(10, pc.text.vocab_size, size=(B, L)).astype(np.int32)
    ids[:, 1 : 1 + n_img] = pc.image_token_index
    answer = list(range(L - cfg.text_units - 1, L - 1))  # the answer at the end, as in a real sample
    positions = np.array([b * L + p for b in range(B) for p in answer], np.int64)
    targets = ids.reshape(-1)[positions + 1].astype(np.int64)
    batch = Batch(ids, None, positions, targets, [f"b{i}" for i in range(B)], B * L)
    aligners = cache = args = None
    if distill:
        width = cfg.teacher.get("hidden", 4096)
        n_s = pc.text.num_hidden_layers
        pairs = [(-1, -1), (16, round(16 / 32 * n_s))]
        aligners = Aligners(pairs, pc.text.hidden_size, width)
        cache = _SyntheticCache(answer, n_img, [t for t, _ in pairs], width)
        args = TrainConfig(stage="distill", lora_dropout=0.0)
    step = StudentStep(model, aligners, args, pc.image_token_index, cache).to(dev)
    params = [p for p in step.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    px = torch.randn(B, 3, pc.vision.image_size, pc.vision.image_size, device=dev)
    kw = dict(
        input_ids=torch.tensor(ids, device=dev, dtype=torch.long),
        positions=torch.tensor(positions, device=dev),
        targets=torch.tensor(targets, device=dev),
        batch=batch,
        pixel_values=px,
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i in range(cfg.warmup + cfg.steps):
        if i == cfg.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast:
            loss = step(**kw)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    del step, model, opt
    if cuda:
        torch.cuda.empty_cache()
    return {"tok_per_s": B * L * cfg.steps / dt, "peak_gb": peak}


def teacher_model(cfg: BenchConfig):
    """A random LLaVA-1.5-7B-shaped Llava (or the toy override) on the GPU in bf16 (CPU: float32)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    t = {"v_hidden": 1024, "v_layers": 24, "v_heads": 16, "image_size": 336, "patch_size": 14, "hidden": 4096,
         "layers": 32, "heads": 32, "vocab": 32064, **cfg.teacher}  # fmt: skip
    v = CLIPVisionConfig(hidden_size=t["v_hidden"], intermediate_size=4 * t["v_hidden"],
                         num_hidden_layers=t["v_layers"], num_attention_heads=t["v_heads"],
                         image_size=t["image_size"], patch_size=t["patch_size"], projection_dim=768)  # fmt: skip
    lm = LlamaConfig(hidden_size=t["hidden"], intermediate_size=int(t["hidden"] * 2.6875) // 8 * 8,
                     num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=t["heads"],
                     vocab_size=t["vocab"], max_position_embeddings=4096)  # fmt: skip
    lc = LlavaConfig(vision_config=v, text_config=lm, image_token_index=t["vocab"] - 1,
                     vision_feature_select_strategy="default", vision_feature_layer=-2)  # fmt: skip
    cuda = torch.cuda.is_available()
    from train_cuda.precision import attn_implementation

    lc._attn_implementation = attn_implementation(cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = LlavaForConditionalGeneration._from_config(lc, dtype=dtype).eval()
    return model, t


def extract_bench(cfg: BenchConfig, root: Path) -> dict:
    """samples/s of `train_cuda.extract`'s loop (decode in a thread, teacher forward, pooling on the device)."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor

    from train_cuda.extract import Plan, extract_batch, prefetched
    from train_cuda.teacher import Teacher, image_tokens

    model, t = teacher_model(cfg)
    n_img, grid, offset = image_tokens(model)
    ip = CLIPImageProcessor(size={"shortest_edge": t["image_size"]},
                            crop_size={"height": t["image_size"], "width": t["image_size"]})  # fmt: skip
    tok = argparse.Namespace(pad_token_id=0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = Teacher(model, tok, ip, "", model.config.image_token_index, n_img, grid, dev, offset)
    rng = np.random.default_rng(0)
    w, h = cfg.image_size
    (root / "img").mkdir(parents=True, exist_ok=True)
    plans = []
    for i in range(cfg.extract_samples):
        path = root / "img" / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path, quality=90)
        text = list(rng.integers(10, t["vocab"] - 2, size=40 + cfg.text_units))
        t_ids = [1] + [teacher.image_token_id] * n_img + [int(x) for x in text]
        pairs = [(len(t_ids) - cfg.text_units + k, k) for k in range(cfg.text_units)]
        plans.append(Plan(f"s{i}", t_ids, pairs, str(path), []))
    s_grid = 14 if not cfg.student else cfg.student["vision"]["image_size"] // cfg.student["vision"]["patch_size"]
    layers = [-1, 16 if not cfg.teacher else 2]

    def run(plans):
        n = 0
        for batch, pixels in prefetched(teacher, plans, cfg.extract_batch, {}):
            n += len(extract_batch(teacher, batch, layers, s_grid, {}, 0, pixels))
        if dev == "cuda":
            torch.cuda.synchronize()
        return n

    run(plans[: cfg.extract_batch])  # warm-up
    t0 = time.perf_counter()
    n = run(plans)
    return {"samples_per_s": n / (time.perf_counter() - t0), "batch": cfg.extract_batch}


def run(cfg: BenchConfig) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke sizes: not the GPU targets)"}
    res["config"] = asdict(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        d = pico_dir(cfg, Path(tmp))
        res["sft"] = train_bench(cfg, d, distill=False, checkpointing=False)
        res["sft_checkpointing"] = train_bench(cfg, d, distill=False, checkpointing=True)
        res["distill_checkpointing"] = train_bench(cfg, d, distill=True, checkpointing=True)
        res["extract"] = extract_bench(cfg, Path(tmp))
    return res


def table(res: dict) -> str:
    c = res["config"]
    rows = [
        f"device: {res['device']}; batch {c['batch']} x {c['seq']} tokens, one image each",
        "| run | tok/s | peak GB |",
        "|---|---|---|",
    ]
    for k in ("sft", "sft_checkpointing", "distill_checkpointing"):
        peak = res[k]["peak_gb"]
        rows.append(f"| {k} | {res[k]['tok_per_s']:,.0f} | {'n/a (CPU)' if peak != peak else f'{peak:.2f}'} |")
    e = res["extract"]
    rows.append(f"extraction: {e['samples_per_s']:.2f} samples/s at batch {e['batch']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m train_cuda.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="toy sizes (the default without a GPU)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps per run")
    ap.add_argument("--out", help="also write the results as JSON here")
    a = ap.parse_args(argv)
    import torch

    cfg = tiny() if a.smoke or not torch.cuda.is_available() else BenchConfig()
    if a.steps:
        cfg.steps = a.steps
    res = run(cfg)
    print(table(res))
    if a.out:
        from bonsai_mlx.core.io import atomic_write_text

        atomic_write_text(Path(a.out), json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
