"""python -m train_cuda.bench: the PyTorch side's speed and memory targets in one command.

On a CUDA GPU (the figures that matter): the full-size Pico (SigLIP-B/16-224 + Qwen2.5-0.5B, random
weights, LM in NF4, bf16 compute) trained at batch 8 x 512 tokens with one 224px image per sample:

- sft tok/s and peak GPU memory, without and with gradient checkpointing;
- distill tok/s and peak memory (checkpointing; two matched layers against 4096-wide teacher targets read from a
  cache on disk through `CacheReader`);
- extraction samples/s for a LLaVA-1.5-7B-shaped teacher (CLIP ViT-L/14-336 + Llama-7B, random bf16
  weights) at batch 16 on 640x480 images, image decoding and pooling included;
- online distillation (`bench_online`): the same teacher (its LM in NF4 when bitsandbytes is there, else bf16)
  run inside every step through `OnlineTeacher`, against the sft step plus the teacher's forward alone.

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


def synthetic_cache(root: Path, sids: list[str], units: list[int], n_image: int, layers: list[int], width: int):
    """A real cache on disk (CacheWriter, read back through CacheReader) holding random teacher targets at `units`
    text positions and `n_image` patches for every sample: distillation reads it as it reads an extracted one."""
    from bonsai_mlx.core.teacher_cache import CacheReader, CacheWriter, Entry

    rng = np.random.default_rng(0)
    manifest = {"teacher": "synthetic", "layers": layers, "hidden_size": width, "student_tokenizer": "-"}
    w = CacheWriter(root, manifest, per_shard=len(sids))
    entries = {}
    for sid in sids:
        t = {L: rng.normal(size=(len(units), width)).astype(np.float32) for L in layers}
        im = {L: rng.normal(size=(n_image, width)).astype(np.float32) for L in layers}
        entries[sid] = Entry(units, units, t, im)
    w.write_shard(0, entries)
    return CacheReader(root)


def train_bench(
    cfg: BenchConfig, model_dir: Path, distill: bool, checkpointing: bool, cache=None, width=None, per_step=None
) -> dict:
    """tok/s, seconds a step and peak memory of the trainers' step (StudentStep under the trainers' precision).
    With `distill`: targets from `cache` (default: a synthetic cache on disk); `per_step(step_module, batch)` runs
    before each step inside the timing (the online teacher refreshing `step_module.cache`)."""
    import contextlib

    import torch

    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.train_config import TrainConfig
    from train_cuda.losses import Aligners, StudentStep
    from train_cuda.student import load_student

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    pc = PicoConfig.load(model_dir)
    model, _ = load_student(str(model_dir), rank=16, dropout=0.0, grad_checkpoint=checkpointing)
    batch, ids, positions, targets = student_batch(cfg, pc)
    aligners = args = None
    if distill:
        width = width or cfg.teacher.get("hidden", 4096)
        pairs = teacher_pairs(cfg, pc.text.num_hidden_layers)
        aligners = Aligners(pairs, pc.text.hidden_size, width)
        if cache is None and per_step is None:
            answer = answer_positions(cfg)
            root = Path(model_dir).parent / "bench-cache"
            cache = synthetic_cache(root, batch.ids, answer, pc.num_image_tokens, [t for t, _ in pairs], width)
        args = TrainConfig(stage="distill", lora_dropout=0.0)
    step = StudentStep(model, aligners, args, pc.image_token_index, cache).to(dev)
    params = [p for p in step.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    px = torch.randn(cfg.batch, 3, pc.vision.image_size, pc.vision.image_size, device=dev)
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
        if per_step is not None:
            per_step(step, batch)
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
    return {"tok_per_s": cfg.batch * cfg.seq * cfg.steps / dt, "step_s": dt / cfg.steps, "peak_gb": peak}


def answer_positions(cfg: BenchConfig) -> list[int]:
    """The answer at the end of each sample, as in a real one: its tokens are supervised and aligned."""
    return list(range(cfg.seq - cfg.text_units - 1, cfg.seq - 1))


def teacher_pairs(cfg: BenchConfig, n_student: int) -> list[tuple[int, int]]:
    """Two matched layers: the last, and the teacher's middle at the same relative depth."""
    mid = 16 if not cfg.teacher else 2
    n_teacher = cfg.teacher.get("layers", 32)
    return [(-1, -1), (mid, round(mid / n_teacher * n_student))]


def student_batch(cfg: BenchConfig, pc):
    """(Batch, ids, flat supervised positions, their targets): random tokens, one image block per sample."""
    from bonsai_mlx.core.batching import Batch

    B, L = cfg.batch, cfg.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(10, pc.text.vocab_size, size=(B, L)).astype(np.int32)
    ids[:, 1 : 1 + pc.num_image_tokens] = pc.image_token_index
    positions = np.array([b * L + p for b in range(B) for p in answer_positions(cfg)], np.int64)
    targets = ids.reshape(-1)[positions + 1].astype(np.int64)
    return Batch(ids, None, positions, targets, [f"b{i}" for i in range(B)], B * L), ids, positions, targets


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


def extract_bench(cfg: BenchConfig, root: Path, teacher) -> dict:
    """samples/s of `train_cuda.extract`'s loop (decode in a thread, teacher forward, pooling on the device)."""
    import torch
    from PIL import Image

    from train_cuda.extract import Plan, extract_batch, prefetched

    rng = np.random.default_rng(0)
    w, h = cfg.image_size
    vocab = teacher.model.config.text_config.vocab_size
    (root / "img").mkdir(parents=True, exist_ok=True)
    plans = []
    for i in range(cfg.extract_samples):
        path = root / "img" / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path, quality=90)
        text = list(rng.integers(10, vocab - 2, size=40 + cfg.text_units))
        t_ids = [1] + [teacher.image_token_id] * teacher.num_image_tokens + [int(x) for x in text]
        pairs = [(len(t_ids) - cfg.text_units + k, k) for k in range(cfg.text_units)]
        plans.append(Plan(f"s{i}", t_ids, pairs, str(path), []))
    s_grid = 14 if not cfg.student else cfg.student["vision"]["image_size"] // cfg.student["vision"]["patch_size"]
    layers = [-1, 16 if not cfg.teacher else 2]

    def run(plans):
        n = 0
        for batch, pixels in prefetched(teacher, plans, cfg.extract_batch, {}):
            n += len(extract_batch(teacher, batch, layers, s_grid, {}, 0, pixels))
        if teacher.device.startswith("cuda"):
            torch.cuda.synchronize()
        return n

    run(plans[: cfg.extract_batch])  # warm-up
    t0 = time.perf_counter()
    n = run(plans)
    return {"samples_per_s": n / (time.perf_counter() - t0), "batch": cfg.extract_batch}


PARTS = ("sft", "sft_checkpointing", "distill_checkpointing", "extract", "teacher_forward", "distill_online")


def run(cfg: BenchConfig, parts=PARTS, deadline: float | None = None, log=None) -> dict:
    """Each part in order; a part that fails is recorded with its error (the others still run), and parts that
    would start after `deadline` (time.time()) are listed as skipped. The teacher is built once: bf16 for
    extraction, then its LM quantised to NF4 (when bitsandbytes is there) for the online parts."""
    import traceback

    import torch

    from bonsai_mlx.core.config import PicoConfig
    from train_cuda import bench_online as bo

    cuda = torch.cuda.is_available()
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke sizes: not the GPU targets)"}
    res.update(config=asdict(cfg), errors={}, skipped=[], seconds={})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = pico_dir(cfg, root)
        pc = PicoConfig.load(d)
        layers = [t for t, _ in teacher_pairs(cfg, pc.text.num_hidden_layers)]
        teacher = plans = pixels = None
        for part in parts:
            if deadline is not None and time.time() > deadline:
                res["skipped"].append(part)
                continue
            t0 = time.time()
            try:
                if part in ("sft", "sft_checkpointing", "distill_checkpointing"):
                    res[part] = train_bench(cfg, d, part.startswith("distill"), part != "sft")
                elif part == "extract":
                    teacher = teacher or bo.bench_teacher(*teacher_model(cfg))[0]
                    res[part] = extract_bench(cfg, root, teacher)
                else:
                    teacher = teacher or bo.bench_teacher(*teacher_model(cfg))[0]
                    if plans is None:
                        res["teacher_precision"] = bo.nf4_in_place(teacher.model)
                        plans = bo.batch_plans(cfg, teacher, pc, root, answer_positions(cfg))
                        from train_cuda.targets import load_pixels

                        pixels = load_pixels(teacher, plans, {})
                    if part == "teacher_forward":
                        res[part] = bo.forward_bench(cfg, teacher, plans, pixels, layers)
                    else:
                        quant = res["teacher_precision"]
                        res[part] = bo.online_bench(cfg, d, teacher, plans, pixels, layers, quant, train_bench)
            except Exception as e:  # a benchmark reports what failed and goes on with the other parts
                res["errors"][part] = f"{type(e).__name__}: {e}"[:500] + "\n" + traceback.format_exc()[-1500:]
            res["seconds"][part] = round(time.time() - t0, 1)
            if log:
                log(f"bench {part}: {res['seconds'][part]} s" + (" (failed)" if part in res["errors"] else ""))
    if all(k in res for k in ("distill_online", "sft_checkpointing", "teacher_forward")):
        base = res["sft_checkpointing"]["step_s"] + res["teacher_forward"]["step_s"]
        res["online_ratio"] = res["distill_online"]["step_s"] / base  # target: <= 1.2
    return res


def table(res: dict) -> str:
    c = res["config"]
    rows = [
        f"device: {res['device']}; batch {c['batch']} x {c['seq']} tokens, one image each",
        "| run | tok/s | s/step | peak GB |",
        "|---|---|---|---|",
    ]
    for k in ("sft", "sft_checkpointing", "distill_checkpointing", "distill_online"):
        if k not in res:
            continue
        peak = res[k]["peak_gb"]
        name = f"{k} (teacher {res[k]['teacher']})" if k == "distill_online" else k
        rows.append(
            f"| {name} | {res[k]['tok_per_s']:,.0f} | {res[k]['step_s']:.3f} | "
            f"{'n/a (CPU)' if peak != peak else f'{peak:.2f}'} |"
        )
    if "teacher_forward" in res:
        f = res["teacher_forward"]
        rows.append(f"teacher forward alone: {f['step_s']:.3f} s a batch ({f['tokens']} tokens a sample)")
    if "online_ratio" in res:
        rows.append(f"online step / (sft step + teacher forward) = {res['online_ratio']:.2f} (target <= 1.2)")
    if "extract" in res:
        e = res["extract"]
        rows.append(f"extraction: {e['samples_per_s']:.2f} samples/s at batch {e['batch']}")
    for k, v in res.get("errors", {}).items():
        rows.append(f"FAILED {k}: {v.splitlines()[0]}")
    if res.get("skipped"):
        rows.append("skipped (time budget): " + ", ".join(res["skipped"]))
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
