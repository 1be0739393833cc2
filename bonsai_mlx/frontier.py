"""python -m bonsai_mlx.frontier: quality vs speed vs memory of a model's variants, and which are worth having.

Each variant (fp16, 8bit, 4bit, pruneR, pruneR+4bit, ...) is built once from the float model, evaluated
on the same data (greedy, VQA-normalised exact match) and benchmarked (TTFT, decode tok/s, peak
RSS, each in its own subprocess). Speed can be measured on a different model built the same way
(`--speed-model random`: the full-size Pico with random weights), since a tiny trained model says
little about the speed of the real one. Writes frontier.md, frontier.json and two PNG plots with
the Pareto-optimal variants marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bonsai_mlx.core.errors import UserError

DEFAULT_VARIANTS = "fp16,8bit,4bit,prune0.75,prune0.75+4bit"


def parse_variant(spec: str) -> tuple[float | None, int | None]:
    """'prune0.75+4bit' -> (0.75, 4); 'fp16' -> (None, None)."""
    keep, bits = None, None
    for part in spec.split("+"):
        if part in ("fp16", "float"):
            continue
        if part in ("8bit", "4bit"):
            bits = int(part[0])
        elif part.startswith("prune"):
            try:
                keep = float(part[len("prune") :])
            except ValueError:
                raise UserError(f"--variants: {spec!r}: prune needs a keep ratio, e.g. prune0.75") from None
        else:
            raise UserError(f"--variants: unknown part {part!r} in {spec!r} (fp16, 8bit, 4bit, prune<keep>)")
    return keep, bits


def build_variant(base: Path, spec: str, root: Path, calib: list[dict] | None = None, image_root=None) -> Path:
    """The variant's checkpoint under root/ (built once, reused after)."""
    out = root / spec
    if (out / "config.json").is_file():
        return out
    from bonsai_mlx.conversion.hf_mlx import to_mlx

    keep, bits = parse_variant(spec)
    src = base
    if keep is not None:
        src = root / f"prune{keep:g}"
        if not (src / "config.json").is_file():
            _prune(base, src, keep, calib, image_root)
        if bits is None:
            return src
    tmp = out.with_name(out.name + ".partial")
    to_mlx(src, tmp, dtype="float16", bits=bits)
    tmp.rename(out)
    return out


def _prune(base: Path, out: Path, keep: float, calib, image_root) -> None:
    import mlx.core as mx

    from bonsai_mlx import loading
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.prune import PruneConfig, prune

    model, cfg = loading.load(base, dtype=mx.float32)
    prune(model, PruneConfig(keep, keep, image_root=image_root), Processor(base, cfg) if calib else None, calib)
    tmp = out.with_name(out.name + ".partial")
    loading.save(model, tmp, dtype=mx.float16, extra_files_from=base)
    tmp.rename(out)


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Maximise both coordinates: a point is optimal when no other is >= in both and > in one."""
    return [not any(o[0] >= p[0] and o[1] >= p[1] and (o[0] > p[0] or o[1] > p[1]) for o in points) for p in points]


def plot(rows: list[dict], x: str, xlabel: str, path: Path, lower_is_better: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(-r[x] if lower_is_better else r[x], r["quality"]) for r in rows]
    best = pareto(pts)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (r, b) in enumerate(sorted(zip(rows, best, strict=True), key=lambda rb: rb[0][x])):
        ax.scatter(r[x], r["quality"], s=60, c="tab:red" if b else "tab:gray", zorder=3)
        # neighbours in x get labels at different heights so close variants stay readable
        ax.annotate(
            r["variant"], (r[x], r["quality"]), textcoords="offset points", xytext=(4, 6 + 11 * (i % 3)), fontsize=8
        )
    front = sorted((r[x], r["quality"]) for r, b in zip(rows, best, strict=True) if b)
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), c="tab:red", lw=1, ls="--", zorder=2, label="Pareto frontier")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("quality (exact match)")
    q = [r["quality"] for r in rows]
    pad = max(0.02, (max(q) - min(q)) * 0.15)
    ax.set_ylim(max(0.0, min(q) - pad), min(1.0, max(q)) + pad)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | quality | TTFT s | decode tok/s | peak RSS GB | LM params | Pareto (speed) | Pareto (memory) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['quality']:.3f} | {r['ttft_s']:.2f} | {r['decode_tps']:.1f} | {r['peak_gb']:.2f} "
            f"| {r['lm_params']:,} | {'yes' if r['pareto_speed'] else ''} | {'yes' if r['pareto_memory'] else ''} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict]:
    from bonsai_mlx import loading
    from bonsai_mlx.bench import random_pico, spawn
    from bonsai_mlx.core.records import read_records
    from bonsai_mlx.evaluate import evaluate
    from bonsai_mlx.generate import load

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = loading.resolve(args.model)
    specs = [v for v in args.variants.split(",") if v]
    for v in specs:
        parse_variant(v)  # fail on a typo before any work
    records = read_records(args.data)[: args.limit]
    calib = read_records(args.calib)[: args.calib_samples] if args.calib else None
    speed_base = None
    if args.speed_model:
        speed_base = random_pico() if args.speed_model == "random" else loading.resolve(args.speed_model)
    rows = []
    for v in specs:
        print(f"== {v}", file=sys.stderr)
        d = build_variant(base, v, out / "variants", calib, args.image_root)
        model, proc = load(str(d))
        s = evaluate(model, proc, records, out / f"preds-{v}.jsonl", args.image_root, args.max_tokens, ("vqa",))
        del model
        sd = build_variant(speed_base, v, out / "speed-variants") if speed_base else d
        b = spawn("mlx", sd, args.tokens)
        if "error" in b:
            raise RuntimeError(f"benchmark of {v} failed: {b['error']}")
        rows.append(
            {
                "variant": v,
                "quality": s["vqa"],
                "quality_by_type": s.get("vqa_by_type", {}),
                "ttft_s": b["ttft_s"],
                "decode_tps": b["decode_tps"],
                "peak_gb": b["peak_gb"],
                "lm_params": _lm_params(sd),
            }
        )
    for r, ps, pm in zip(
        rows,
        pareto([(r["decode_tps"], r["quality"]) for r in rows]),
        pareto([(-r["peak_gb"], r["quality"]) for r in rows]),
        strict=True,
    ):
        r["pareto_speed"], r["pareto_memory"] = ps, pm
    return rows


def _lm_params(model_dir: Path) -> int:
    """LM parameter count from the config (quantized tensors pack several weights per element)."""
    from bonsai_mlx.core.config import PicoConfig

    t = PicoConfig.load(model_dir).text
    hd = t.attention_head_dim
    attn = t.hidden_size * hd * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
    attn += hd * (t.num_attention_heads + 2 * t.num_key_value_heads)  # q/k/v biases
    mlp = 3 * t.hidden_size * t.intermediate_size
    per_layer = attn + mlp + 2 * t.hidden_size
    emb = t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)
    return t.num_hidden_layers * per_layer + emb + t.hidden_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.frontier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (the embedded default's model for quality, the full-size random Pico for speed):\n"
        "  python -m bonsai_mlx.frontier --model runs/shapes/model --data runs/shapes/data/eval.json \\\n"
        "      --image-root runs/shapes/data/images --speed-model random --out report/",
    )
    ap.add_argument("--model", required=True, help="the float model whose variants are compared")
    ap.add_argument("--data", required=True, help="eval set (LLaVA JSON or question/answer records)")
    ap.add_argument("--image-root")
    ap.add_argument("--out", default="frontier", help="report folder (variants, predictions, table, plots)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list: fp16, 8bit, 4bit, prune<keep>, a+b")
    ap.add_argument("--calib", help="calibration data for pruning (default: weight-norm importance)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--speed-model", help="measure speed/memory on this model's variants instead; 'random' = full Pico")
    ap.add_argument("--limit", type=int, help="evaluate only the first N records")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64, help="forced new tokens for decode speed")
    args = ap.parse_args(argv)
    from bonsai_mlx.core.errors import friendly
    from bonsai_mlx.core.io import atomic_write_text

    with friendly("frontier"):
        rows = run(args)
        out = Path(args.out)
        atomic_write_text(out / "frontier.json", json.dumps(rows, indent=2))
        plot(rows, "decode_tps", "decode tokens/s", out / "quality_vs_decode.png")
        plot(rows, "peak_gb", "peak RSS (GB), lower is better", out / "quality_vs_memory.png", lower_is_better=True)
        speed = f"speed and memory: {args.speed_model}" if args.speed_model else "speed and memory: the same model"
        md = (
            f"# Frontier of {args.model}\n\nQuality: VQA exact match on {args.data}; {speed}.\n\n{table(rows)}\n\n"
            "![quality vs decode speed](quality_vs_decode.png)\n![quality vs peak memory](quality_vs_memory.png)\n"
        )
        atomic_write_text(out / "frontier.md", md)
        print(table(rows))
        print(f"report: {out / 'frontier.md'}; plots: {out / 'quality_vs_decode.png'}, {out / 'quality_vs_memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
