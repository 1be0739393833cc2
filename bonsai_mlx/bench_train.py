"""python -m bonsai_mlx.bench_train: QLoRA instruct-training speed and memory of the full-size Pico.

Random weights (the `bench --random pico` checkpoint), synthetic 512-token samples with one 224px
image, LoRA r=16 on all LM projections over a 4-bit frozen LM. Each configuration runs in its own
subprocess so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def work(batch: int, tokens: int, ckpt: bool, steps: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from bonsai_mlx import loading
    from bonsai_mlx.bench import bench_image, peak_rss_gb, random_pico
    from bonsai_mlx.core.batching import collate
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.core.records import Example
    from bonsai_mlx.core.train_config import TrainConfig
    from bonsai_mlx.quantize import quantize_base
    from bonsai_mlx.trainer import Trainer, setup_trainable

    d = random_pico()
    model, cfg = loading.load(d)
    proc = Processor(d, cfg)
    quantize_base(model, 4)
    tc = TrainConfig(stage="instruct", batch_size=batch, grad_checkpoint=ckpt, max_steps=steps + 1, lora_dropout=0.0)
    mx.random.seed(0)
    setup_trainable(model, tc)
    rng = np.random.default_rng(0)
    n_img = cfg.num_image_tokens
    text = tokens - n_img
    ex = []
    for i in range(batch):
        ids = [proc.image_token_id] * n_img + rng.integers(0, 150000, text).tolist()
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
        "batch": batch,
        "tokens": tokens,
        "grad_checkpoint": ckpt,
        "step_s": dt,
        "tokens_per_s": batch * tokens / dt,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
        "peak_rss_gb": peak_rss_gb(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bonsai_mlx.bench_train", description=__doc__)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        import bonsai_mlx  # noqa: F401

        b, t, c = a.worker
        print(json.dumps(work(int(b), int(t), c == "1", a.steps)))
        return 0
    from bonsai_mlx.bench import random_pico

    random_pico()
    rows = []
    for b in (int(x) for x in a.batch_sizes.split(",")):
        for c in (False, True):
            print(f"batch {b}, grad checkpointing {'on' if c else 'off'} ...", file=sys.stderr)
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bonsai_mlx.bench_train",
                    "--steps",
                    str(a.steps),
                    "--worker",
                    str(b),
                    str(a.tokens),
                    "1" if c else "0",
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode:
                rows.append({"batch": b, "grad_checkpoint": c, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"\nQLoRA (4-bit LM, LoRA r=16 on all LM projections), {a.tokens} tokens per sample, one 224px image each\n")
    print("| batch | grad ckpt | s/step | tokens/s | MLX peak GB | peak RSS GB |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {'on' if r['grad_checkpoint'] else 'off'} | error: {r['error']} | | | |")
        else:
            print(
                f"| {r['batch']} | {'on' if r['grad_checkpoint'] else 'off'} | {r['step_s']:.1f} | "
                f"{r['tokens_per_s']:.0f} | {r['mlx_peak_gb']:.2f} | {r['peak_rss_gb']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
