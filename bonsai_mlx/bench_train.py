"""python -m bonsai_mlx.bench_train: QLoRA instruct-training speed and memory of the full-size Pico.

Random weights (the `bench --random pico` checkpoint, or --model), synthetic 512-token samples with one
224px image, LoRA r=16 on all LM projections over a 4-bit frozen LM. Each configuration runs in its own
subprocess so its peak memory is its own. Where PyTorch sees CUDA, `train_cuda.sft` (NF4 QLoRA) runs the
same configurations on the same GPU, beside the MLX trainer, so the two trainers compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bonsai_mlx.core.errors import UserError


def work(batch: int, tokens: int, ckpt: bool, steps: int, model_dir: str | None = None) -> dict:
    import mlx.core as mx
    import numpy as np

    from bonsai_mlx import device, loading
    from bonsai_mlx.bench import bench_image, peak_rss_gb, random_pico
    from bonsai_mlx.core.batching import collate
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.core.records import Example
    from bonsai_mlx.core.train_config import TrainConfig
    from bonsai_mlx.quantize import quantize_base
    from bonsai_mlx.trainer import Trainer, setup_trainable

    d = Path(model_dir) if model_dir else random_pico()
    model, cfg = loading.load(d)
    proc = Processor(d, cfg)
    quantize_base(model, 4, group_size=64 if cfg.text.hidden_size % 64 == 0 else 32)
    tc = TrainConfig(stage="instruct", batch_size=batch, grad_checkpoint=ckpt, max_steps=steps + 1, lora_dropout=0.0)
    mx.random.seed(0)
    setup_trainable(model, tc)
    rng = np.random.default_rng(0)
    n_img = cfg.num_image_tokens
    text = tokens - n_img
    ex = []
    for i in range(batch):
        ids = [proc.image_token_id] * n_img + rng.integers(0, min(150000, cfg.text.vocab_size - 1), text).tolist()
        labels = [-100] * (n_img + text // 2) + ids[n_img + text // 2 :]  # supervise the second half
        ex.append(Example(f"b{i}", ids, labels, None, 1))
    img = bench_image()
    batch_ = collate(ex, proc, 0)  # the image tokens are in ids; pixels are attached below
    batch_.pixel_values = proc.pixel_values([img] * batch)
    from bonsai_mlx.core.records import Dataset

    tr = Trainer(tc, model, proc, Dataset(ex))
    tr.train_step([batch_])  # warm-up
    mx.reset_peak_memory()
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step([batch_])
    dt = (time.perf_counter() - t) / steps
    return {
        "engine": "bonsai_mlx",
        "device": device.backend(),
        "batch": batch,
        "tokens": tokens,
        "grad_checkpoint": ckpt,
        "step_s": dt,
        "tokens_per_s": batch * tokens / dt,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
        "peak_rss_gb": peak_rss_gb(),
    }


def embedded_steps(steps: int, rounds: int, root: str | None = None) -> list[dict]:
    """The embedded default's training step (its tiny Pico, its options, its synthetic batches), eager and
    compiled in the same process, interleaved over `rounds` so that machine load hits both alike."""
    import mlx.core as mx

    from bonsai_mlx import _blas, loading
    from bonsai_mlx.core import synthetic
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.core.records import Dataset, read_records
    from bonsai_mlx.core.train_config import TrainConfig
    from bonsai_mlx.embedded import DEFAULT, make_default_model
    from bonsai_mlx.trainer import Trainer, setup_trainable

    work_dir = Path(root or tempfile.mkdtemp(prefix="bench-embedded-"))
    if not (work_dir / "data" / "train.json").is_file():
        dd = synthetic.DEFAULT_DATA  # the default's own samples (three questions an image), not the export's one
        synthetic.export(
            work_dir / "data",
            32 * (steps + 2),
            8,
            seed=0,
            size=dd["image_size"],
            caption_share=dd["caption_share"],
            questions=dd["questions"],
        )
    model_dir = make_default_model(work_dir / "init")
    trainers = {}
    for compiled in (False, True):
        model, pcfg = loading.load(model_dir)
        proc = Processor(model_dir, pcfg)
        tc = TrainConfig(**{**DEFAULT, "out": str(work_dir / "run"), "compile": compiled, "max_steps": 10**6})
        mx.random.seed(0)
        setup_trainable(model, tc)
        ds = Dataset.build(read_records(work_dir / "data" / "train.json"), proc, str(work_dir / "data" / "images"))
        tr = Trainer(tc, model, proc, ds)
        batches = [next(tr.micro_batches(k)) for k in range(steps + 1)]
        tr.train_step([batches[0]])  # warm-up (and, compiled, the trace)
        trainers[compiled] = (tr, batches[1:])
    # (name, compiled, OpenBLAS threads): every core, then one thread (what bonsai_mlx._blas picks on busy cores)
    default_threads = _blas.get_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    variants = [("eager", False, cores), ("compiled", True, cores)]
    if default_threads is not None and cores > 1:
        variants.append(("compiled, OpenBLAS 1 thread", True, 1))
    else:
        variants = [(name, c, default_threads) for name, c, _ in variants]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(rounds):
        for name, compiled, threads in variants:
            if threads is not None:
                _blas.set_threads(threads)
            tr, batches = trainers[compiled]
            t = time.perf_counter()
            for b in batches:
                tr.train_step([b])
            times[name].append((time.perf_counter() - t) / len(batches))
    if default_threads is not None:
        _blas.set_threads(default_threads)
    rows = []
    for name, _, threads in variants:
        ts = times[name]
        rows.append({"step": name, "step_s": float(np.median(ts)), "rounds": ts, "blas_threads": threads})
    return rows


def cuda_present() -> bool:
    """Whether PyTorch sees a CUDA GPU (asked in a subprocess: this process stays free of torch)."""
    code = "import torch; print(torch.cuda.is_available())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip().endswith("True")


def write_samples(root: Path, model_dir: Path, batch: int, tokens: int) -> tuple[Path, int]:
    """`batch` LLaVA records of one 224px image and a random answer long enough to fill `tokens` once
    the processor has expanded <image>; returns (records path, the --max-length that cuts them to `tokens`)."""
    import numpy as np

    from bonsai_mlx.bench import bench_image
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.processing import Processor

    cfg = PicoConfig.load(model_dir)
    tok = Processor(model_dir, cfg).tokenizer
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    bench_image().save(root / "img" / "bench.png")
    recs = []
    for i in range(batch):
        answer = tok.decode(rng.integers(0, min(150000, cfg.text.vocab_size - 1), tokens).tolist())
        recs.append(
            {
                "id": f"b{i}",
                "image": "bench.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    path = root / "samples.json"
    path.write_text(json.dumps(recs))
    return path, tokens


def train_cuda_command(model_dir: Path, data: Path, out: Path, batch: int, max_length: int, ckpt: bool, steps: int):
    """The train_cuda.sft run matching one MLX configuration (LoRA r=16 on all LM projections, 4-bit LM)."""
    cmd = [sys.executable, "-m", "train_cuda.sft", "--student", str(model_dir), "--data", str(data)]
    cmd += ["--image-root", str(data.parent / "img"), "--out", str(out), "--batch-size", str(batch)]
    cmd += ["--max-steps", str(steps + 1), "--max-length", str(max_length), "--log-every", "1"]
    cmd += ["--lora-rank", "16", "--lora-dropout", "0", "--warmup", "1"]
    return cmd + ([] if ckpt else ["--no-grad-checkpoint"])


def step_seconds(metrics: list[dict], batch_tokens: list[int]) -> float:
    """Steady-state seconds per step from train_cuda's cumulative tokens/s rows (the first step is warm-up)."""
    toks = np.cumsum(batch_tokens[: len(metrics)])
    t = [n / r["tokens_per_s"] for n, r in zip(toks, metrics, strict=True)]
    return (t[-1] - t[0]) / (len(t) - 1)


def work_train_cuda(batch: int, tokens: int, ckpt: bool, steps: int, model_dir: str | None = None) -> dict:
    """One train_cuda.sft configuration; its peak RSS is that of the child (this wrapper holds no torch)."""
    from bonsai_mlx.bench import random_pico

    d = Path(model_dir) if model_dir else random_pico()
    with tempfile.TemporaryDirectory() as tmp:
        data, max_length = write_samples(Path(tmp), d, batch, tokens)
        r = subprocess.run(
            train_cuda_command(d, data, Path(tmp) / "run", batch, max_length, ckpt, steps),
            capture_output=True,
            text=True,
        )
        if r.returncode:
            raise RuntimeError((r.stderr.strip().splitlines() or ["train_cuda.sft failed"])[-1])
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    dt = step_seconds(rows, [batch * tokens] * len(rows))
    return {
        "engine": "train_cuda",
        "device": "cuda" if cuda_present() else "cpu",
        "batch": batch,
        "tokens": tokens,
        "grad_checkpoint": ckpt,
        "step_s": dt,
        "tokens_per_s": batch * tokens / dt,
        "mlx_peak_gb": None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9,
    }


def engines(choice: str) -> list[str]:
    """auto: the MLX trainer, plus train_cuda on the same GPU where PyTorch sees CUDA."""
    if choice != "auto":
        names = [e for e in choice.split(",") if e]
        bad = [e for e in names if e not in ("mlx", "train_cuda")]
        if bad or not names:
            raise UserError(f"--engines: expected auto or a list of mlx, train_cuda, got {choice!r}")
        return names
    return ["mlx", "train_cuda"] if cuda_present() else ["mlx"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bonsai_mlx.bench_train", description=__doc__)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", help="a Pico directory (default: the full-size random Pico)")
    ap.add_argument(
        "--engines", default="auto", help="auto (MLX, plus train_cuda where CUDA is present) or mlx,train_cuda"
    )
    ap.add_argument(
        "--embedded",
        action="store_true",
        help="instead: the embedded default's step (python -m bonsai_mlx.train), eager vs compiled in one process",
    )
    ap.add_argument("--rounds", type=int, default=3, help="--embedded: interleaved rounds of --steps steps each")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.embedded:
        rows = embedded_steps(a.steps, a.rounds)
        eager, comp = rows[0]["step_s"], rows[1]["step_s"]
        print("\nthe embedded default's step (batch 32, tiny Pico, stage full), median over rounds\n")
        print("| step | OpenBLAS threads | s/step | rounds |\n|---|---|---|---|")
        for r in rows:
            rounds = ", ".join(f"{x:.3f}" for x in r["rounds"])
            print(f"| {r['step']} | {r['blas_threads'] or '-'} | {r['step_s']:.3f} | {rounds} |")
        print(f"\ncompiled / eager: {comp / eager:.2f}x the time")
        if len(rows) > 2:
            print(f"compiled, OpenBLAS 1 thread / on every core: {rows[2]['step_s'] / comp:.2f}x the time")
            from bonsai_mlx import _blas

            busy = _blas.busy_now()
            n = _blas.blas_threads(busy) or "your"
            print(f"(with {busy:.1f} cores busy elsewhere now, a run would give OpenBLAS {n} threads)")
        return 0
    if a.worker:
        import bonsai_mlx  # noqa: F401

        e, b, t, c = a.worker
        fn = work if e == "mlx" else work_train_cuda
        print(json.dumps(fn(int(b), int(t), c == "1", a.steps, a.model)))
        return 0
    from bonsai_mlx.bench import random_pico
    from bonsai_mlx.core.errors import friendly

    with friendly("bench_train"):
        names = engines(a.engines)
        if not a.model:
            random_pico()
        rows = []
        for b in (int(x) for x in a.batch_sizes.split(",")):
            for c in (False, True):
                for e in names:
                    print(f"{e}: batch {b}, grad checkpointing {'on' if c else 'off'} ...", file=sys.stderr)
                    cmd = [sys.executable, "-m", "bonsai_mlx.bench_train", "--steps", str(a.steps)]
                    cmd += ["--model", a.model] if a.model else []
                    r = subprocess.run(
                        [*cmd, "--worker", e, str(b), str(a.tokens), "1" if c else "0"], capture_output=True, text=True
                    )
                    if r.returncode:
                        err = (r.stderr.strip().splitlines() or ["?"])[-1]
                        rows.append({"engine": e, "batch": b, "grad_checkpoint": c, "error": err})
                    else:
                        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(
            f"\nQLoRA (4-bit LM, LoRA r=16 on all LM projections), {a.tokens} tokens per sample, one 224px image each\n"
        )
        print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        "| engine (device) | batch | grad ckpt | s/step | tokens/s | MLX peak GB | peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['engine']} ({r.get('device', '?')}) | {r['batch']} | {'on' if r['grad_checkpoint'] else 'off'} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | |")
            continue
        mlx_peak = f"{r['mlx_peak_gb']:.2f}" if r.get("mlx_peak_gb") is not None else "-"
        lines.append(f"{head} {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {mlx_peak} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
