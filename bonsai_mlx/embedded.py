"""The embedded default: its preset options, its tiny from-scratch Pico, and its per-type accuracy report.

Both `train` (the CLI's defaults) and `runner` (the run itself) read this, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from bonsai_mlx.core import synthetic
from bonsai_mlx.core.records import read_records
from bonsai_mlx.core.synthetic import DEFAULT_DATA
from bonsai_mlx.evaluate import predict_records
from bonsai_mlx.metrics import vqa_normalize

# The embedded default: sized to reach >= 90% held-out exact match within minutes on 2 CPU cores.
DEFAULT = dict(
    stage="full",
    group_by_length=False,
    batch_size=32,
    lr=5e-4,
    warmup=100,
    max_steps=2000,
    weight_decay=0.01,
    max_length=128,
    eval_every=400,
    save_every=400,
    log_every=20,
    out="runs/shapes",
    lora_dropout=0.0,
)
# The embedded default's model: bonsai_mlx.tiny.TinyRecipe fields that differ from its defaults. One 24px patch per
# cell of the 48px image: measured over 39 runs (docs/embedded_task.md), every question type but shape is learned
# fastest this way (colour 100% at 3000 steps vs 76% with 8px patches); shape is not learned by any tower size tried.
RECIPE: dict = dict(patch_size=24)


def default_recipe(image_size: int | None = None):
    """The embedded default's model sizes (a bonsai_mlx.tiny.TinyRecipe) for the task's image size."""
    from bonsai_mlx.tiny import TinyRecipe

    return TinyRecipe(image_size=image_size or DEFAULT_DATA["image_size"], **RECIPE)


def make_default_model(out: Path, image_size: int | None = None, seed: int = 0) -> Path:
    """The embedded default's tiny Pico: small SigLIP + small Qwen2 + a tokenizer trained on the task."""
    from bonsai_mlx import tiny

    if (out / "config.json").is_file():
        return out
    tiny.make_tiny(out, synthetic.corpus(), default_recipe(image_size), seed)
    return out


def accuracy(model, proc, data: str, image_root: str | None, limit: int | None = None) -> dict[str, float]:
    """Greedy exact match per question type (records carry a 'type')."""
    recs = read_records(data)[:limit]
    preds = predict_records(model, proc, recs, image_root, max_tokens=8)
    by: dict[str, list[bool]] = {}
    for rec, pred in zip(recs, preds, strict=True):
        ok = vqa_normalize(pred) == vqa_normalize(rec["conversations"][1]["value"])
        by.setdefault(rec.get("type", "all"), []).append(ok)
        by.setdefault("overall", []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def main(argv: list[str] | None = None) -> int:
    """`init OUT` builds the embedded default's untrained Pico; `score MODEL DATA` writes its per-type accuracy.

    Commands, so that a PyTorch-side experiment (experiments.shapes_kd) drives the MLX steps in
    their own processes instead of importing MLX.
    """
    import argparse
    import json
    import sys

    from bonsai_mlx.core.errors import friendly
    from bonsai_mlx.core.io import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m bonsai_mlx.embedded", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="the embedded default's untrained tiny Pico")
    p.add_argument("out")
    p.add_argument("--image-size", type=int, default=DEFAULT_DATA["image_size"])
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("score", help="greedy exact match per question type, as JSON")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--image-root")
    p.add_argument("--out", help="write the JSON here too")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with friendly("embedded"):
        if a.cmd == "init":
            print(make_default_model(Path(a.out), a.image_size, a.seed))
            return 0
        from bonsai_mlx.generate import load

        model, proc = load(a.model)
        acc = json.dumps(accuracy(model, proc, a.data, a.image_root))
        if a.out:
            atomic_write_text(a.out, acc)
        print(acc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
