"""Sweep the embedded default's task, model and preset knobs; each run its own process, several at once.

    python -m experiments.embedded_sweep SPECS.json OUT_DIR [PARALLEL]

SPECS.json maps a run name to overrides: `recipe` (bonsai_mlx.tiny.TinyRecipe fields), `preset`
(bonsai_mlx.embedded.DEFAULT fields), `style` (bonsai_mlx.core.synthetic.DrawStyle fields, with `draw` naming
that variant), and DEFAULT_DATA keys (n_train, n_eval, image_size, questions, caption_share). Every run is the
embedded default (`bonsai_mlx.runner.run` with no model and no data) with those overrides, so it draws, trains and
reports held-out accuracy per question type exactly as `python -m bonsai_mlx.train` does. Each run is a step
(experiments/steps.py: OUT_DIR/logs/NAME.log); results stream to OUT_DIR/results.jsonl, and a rerun skips the runs
that finished. SWEEP_DTYPE=float32 pins the dtype on a GPU backend (MLX CUDA runs bfloat16 by default).
The specs and results behind docs/embedded_task.md are in docs/results/embedded_sweep/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments.steps import StepFailed, Steps

DATA_KEYS = ("n_train", "n_eval", "image_size", "questions", "caption_share")


def _apply(spec: dict) -> dict:
    """Set the overrides in this process; returns the preset."""
    from bonsai_mlx import embedded
    from bonsai_mlx.core import synthetic

    for k in DATA_KEYS:
        if k in spec:
            synthetic.DEFAULT_DATA[k] = spec[k]
    embedded.RECIPE.update(spec.get("recipe", {}))
    for k, v in spec.get("style", {}).items():
        setattr(synthetic.STYLE, k, v)
    preset = {**embedded.DEFAULT, **spec.get("preset", {})}
    if os.environ.get("SWEEP_DTYPE"):
        preset["dtype"] = os.environ["SWEEP_DTYPE"]
    return preset


def _data_dir(root: Path, spec: dict) -> Path:
    from bonsai_mlx.core.synthetic import DEFAULT_DATA as d

    name = f"data-{d['image_size']}-{d['n_train']}-q{d['questions']}-c{d['caption_share']}"
    return root / f"{name}-{spec.get('draw', '')}"


def one(spec: dict, out: Path, draw_only: bool = False) -> None:
    """One run (in this process): draw the data once per variant, then the embedded default's training."""
    preset = _apply(spec)
    from bonsai_mlx.core import synthetic

    d = synthetic.DEFAULT_DATA
    shared = _data_dir(out.parent, spec)
    if draw_only:
        if not (shared / "eval.json").is_file():
            synthetic.export(
                shared, d["n_train"], d["n_eval"], seed=preset.get("seed", 0), size=d["image_size"],
                caption_share=d["caption_share"], questions=d["questions"],
            )  # fmt: skip
        return
    out.mkdir(parents=True, exist_ok=True)
    if shared.is_dir() and not (out / "data").exists():
        (out / "data").symlink_to(shared.resolve())
    from bonsai_mlx.core.train_config import TrainConfig
    from bonsai_mlx.runner import run

    t = time.perf_counter()
    run(TrainConfig.from_dict({**preset, "out": str(out)}))
    acc = json.loads((out / "heldout_accuracy.json").read_text())
    metrics = out / "metrics.jsonl"
    evals = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    evals = [e for e in evals if "overall" in e]
    res = {"spec": spec, "wall_s": round(time.perf_counter() - t, 1), "acc": acc, "evals": evals}
    print(json.dumps(res), flush=True)  # the last line: the step's result


def sweep(specs: dict, root: Path, parallel: int) -> None:
    steps = Steps(root, "embedded_sweep")
    me = "experiments.embedded_sweep"

    variants = {}
    for name, spec in specs.items():
        key = tuple(str(spec.get(k)) for k in (*DATA_KEYS, "draw"))
        variants.setdefault(key, (name, spec))

    def draw(item: tuple[str, dict]) -> None:
        """Each data variant's images, once, before the runs that share them start."""
        name, spec = item
        steps.run(f"{name}.draw", me, "--one", json.dumps(spec), str(root / name), "--draw")

    with ThreadPoolExecutor(parallel) as ex:
        list(ex.map(draw, variants.values()))

    def run_one(item: tuple[str, dict]) -> None:
        name, spec = item
        t = time.time()
        try:
            r, rc = dict(steps.run(name, me, "--one", json.dumps(spec), str(root / name))), 0
        except StepFailed as e:
            r, rc = {"spec": spec, "error": e.log.read_text()[-1500:]}, e.code
        if name not in steps.ran and rc == 0:
            return  # finished by an earlier sweep: its row is in results.jsonl already
        for k in ("seconds", "cpu_seconds"):
            r.pop(k, None)
        r.update(name=name, rc=rc, elapsed=round(time.time() - t, 1))
        with open(root / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name} rc={rc} " + " ".join(f"{k}={v:.3f}" for k, v in r.get("acc", {}).items()), flush=True)

    with ThreadPoolExecutor(parallel) as ex:
        list(ex.map(run_one, specs.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # one run, in the child process the sweep starts: --one SPEC OUT [--draw]
        one(json.loads(argv[1]), Path(argv[2]), draw_only="--draw" in argv[3:])
        return 0
    ap = argparse.ArgumentParser(
        prog="python -m experiments.embedded_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("specs", help="JSON: run name -> overrides")
    ap.add_argument("out", help="folder of the runs, their logs and results.jsonl")
    ap.add_argument("parallel", nargs="?", type=int, default=4, help="runs at once (default 4)")
    a = ap.parse_args(argv)
    sweep(json.loads(Path(a.specs).read_text()), Path(a.out), a.parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
