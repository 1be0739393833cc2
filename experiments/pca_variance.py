"""python -m experiments.pca_variance: how much of the teacher's states a PCA cache loses, in miniature.

`extract --pca K` stores K coordinates per state instead of the hidden size D. For LLaVA-1.5-7B the setting that
fits LLaVA-Instruct-150k in <= 150 GB is one layer at K = 1024 of D = 4096 (docs/distillation_cache.md), i.e. K/D
= 1/4. Here the shapes_kd teacher (LLaVA-1.5-shaped, trained on the shapes task; reused from `--out` if there)
and the same architecture untrained give their states through `train_cuda.extract` (no PCA); a basis is fitted
on the first `--fit` samples' units per layer, as extract fits it, and the variance it keeps is measured on other
samples (`--eval`), for K/D in `--ratios`. A miniature's spectrum is not a 7B's: the figures say what the
code loses on this task, not what LLaVA-1.5-7B will lose (measure that on the real cache: extract prints it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments.steps import Steps, say


def _log(msg: str) -> None:
    say("pca_variance", msg)


def teacher(out: Path, trained: bool, steps: int, n_train: int) -> Path:
    """The shapes_kd teacher (trained as shapes_kd trains it) or the same architecture at its initialisation."""
    from bonsai_mlx.core import synthetic
    from bonsai_mlx.core.io import atomic_write_text
    from bonsai_mlx.core.synthetic import DEFAULT_DATA
    from experiments import tiny_teacher
    from experiments.shapes_kd import Setup

    s = Setup()
    d = out / ("teacher" if trained else "teacher-untrained")
    if (d / "trained.json").is_file() or (not trained and (d / "config.json").is_file()):
        return d
    tiny_teacher.build(d, synthetic.corpus(), hidden=s.teacher_hidden, layers=s.teacher_layers,
                       vision_hidden=s.teacher_vision_hidden, image_size=DEFAULT_DATA["image_size"], patch_size=8,
                       vocab_size=400, init_std=0.08)  # fmt: skip
    if trained:
        train = json.loads((out / "data" / "train.json").read_text())[:n_train]
        _log(f"training the teacher ({steps} steps on {len(train)} samples)")
        tiny_teacher.train(d, train, str(out / "data" / "images"), steps, s.batch_size, s.teacher_lr, log=_log)
        atomic_write_text(d / "trained.json", json.dumps({"steps": steps, "samples": len(train)}))
    return d


def units(cache: Path, sids: list[str], layer: int) -> np.ndarray:
    """Every cached state (text units and pooled image units) of these samples at one layer, float64."""
    from bonsai_mlx.core.teacher_cache import CacheReader

    c = CacheReader(cache)
    rows = []
    for sid in sids:
        e = c.get(sid)
        rows.append(e.text[layer].astype(np.float64))
        if e.image:
            rows.append(e.image[layer].astype(np.float64))
    return np.concatenate(rows)


def measure(cache: Path, n_fit: int, ratios: list[float]) -> dict:
    """{layer: {K: (kept on the fitted units, kept on the held-out units)}} and the hidden size."""
    from bonsai_mlx.core.teacher_cache import CacheReader, PcaFit

    c = CacheReader(cache)
    sids = list(c.where)
    fit_ids, eval_ids = sids[:n_fit], sids[n_fit:]
    out = {}
    for layer in c.layers:
        x_fit, x_eval = units(cache, fit_ids, layer), units(cache, eval_ids, layer)
        dim = x_fit.shape[1]
        pca = PcaFit(dim)
        pca.add(x_fit)
        out[layer] = {}
        for r in ratios:
            k = max(1, round(dim * r))
            mean, comps, kept_fit = pca.finish(k)
            xc = x_eval - mean
            resid = xc - (xc @ comps.T) @ comps
            kept_eval = 1 - float((resid**2).sum() / (xc**2).sum())
            # the loss sees the difference directly: MSE between a state and its reconstruction, per element
            out[layer][k] = {"kept_fit": kept_fit, "kept_eval": kept_eval, "mse": float((resid**2).mean())}
    return {"hidden": dim, "units_fit": len(x_fit), "units_eval": len(x_eval), "layers": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.pca_variance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", default="runs/shapes-kd", help="a shapes_kd folder (its data and teacher are reused)")
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--n-train", type=int, default=12000, help="samples the teacher trains on")
    ap.add_argument("--fit", type=int, default=256, help="samples the basis is fitted on (extract --pca-samples)")
    ap.add_argument("--eval", type=int, default=256, help="other samples it is measured on")
    ap.add_argument("--ratios", default="0.0625,0.125,0.25,0.5", help="K/D values (LLaVA-1.5 --pca 1024: 0.25)")
    ap.add_argument("--layers", default="-1,2")
    a = ap.parse_args(argv)
    from bonsai_mlx.core import synthetic
    from bonsai_mlx.core.io import atomic_write_text
    from bonsai_mlx.core.synthetic import DEFAULT_DATA
    from train_cuda.extract import main as extract

    out = Path(a.out)
    data = out / "data"
    if not (data / "eval.json").is_file():
        synthetic.export(data, DEFAULT_DATA["n_train"], DEFAULT_DATA["n_eval"], seed=0, size=DEFAULT_DATA["image_size"])
    init = out / "student-init"
    size = str(DEFAULT_DATA["image_size"])
    steps = Steps(out / "pca-variance", "pca_variance")
    steps.run("student-init", "bonsai_mlx.embedded", "init", str(init), "--image-size", size, done=init / "config.json")
    subset = out / "pca-variance" / "samples.json"
    train = json.loads((data / "train.json").read_text())
    atomic_write_text(subset, json.dumps(train[-(a.fit + a.eval) :]))  # samples the students never train on
    ratios = [float(x) for x in a.ratios.split(",")]
    res = {"fit": a.fit, "eval": a.eval, "ratios": ratios}
    for name, trained in (("trained", True), ("untrained", False)):
        t = teacher(out, trained, a.teacher_steps, a.n_train)
        cache = out / "pca-variance" / f"cache-{name}"
        extract(["--teacher", str(t), "--data", str(subset), "--image-root", str(data / "images"),
                 "--student-tokenizer", str(init), f"--layers={a.layers}", "--out", str(cache),
                 "--batch-size", "16", "--per-shard", "128"])  # fmt: skip
        res[name] = measure(cache, a.fit, ratios)
        _log(f"{name}: " + json.dumps(res[name]["layers"]))
    atomic_write_text(out / "pca-variance" / "results.json", json.dumps(res, indent=2))
    atomic_write_text(out / "pca-variance" / "results.md", report(res))
    print(report(res))
    return 0


def report(res: dict) -> str:
    lines = ["| teacher | layer | K / D | variance kept (fit) | variance kept (held out) | MSE of the reconstruction |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("trained", "untrained"):
        r = res[name]
        for layer, by_k in r["layers"].items():
            for k, v in by_k.items():
                lines.append(f"| {name} | {layer} | {k} / {r['hidden']} | {v['kept_fit']:.1%} | {v['kept_eval']:.1%} "
                             f"| {v['mse']:.3f} |")  # fmt: skip
    r = res["trained"]
    lines.append(
        f"\nBasis fitted on {res['fit']} samples ({r['units_fit']:,} units), measured on {res['eval']} others "
        f"({r['units_eval']:,} units). States are LayerNorm-normalised (mean square 1 per element)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
