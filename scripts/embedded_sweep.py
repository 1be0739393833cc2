"""Sweep the embedded default's task, model and preset knobs; each run its own process, several at once.

    python scripts/embedded_sweep.py SPECS.json OUT_DIR [PARALLEL]

SPECS.json maps a run name to overrides: `recipe` (bonsai_mlx.tiny.TinyRecipe fields), `preset`
(bonsai_mlx.embedded.DEFAULT fields), `style` (bonsai_mlx.core.synthetic.DrawStyle fields, with `draw` naming
that variant), and DEFAULT_DATA keys (n_train, n_eval, image_size, questions, caption_share). Every run is the
embedded default (`bonsai_mlx.runner.run` with no model and no data) with those overrides, so it draws, trains and
reports held-out accuracy per question type exactly as `python -m bonsai_mlx.train` does. Results stream to
OUT_DIR/results.jsonl. SWEEP_DTYPE=float32 pins the dtype on a GPU backend (MLX CUDA runs bfloat16 by default).
The specs and results behind docs/embedded_task.md are in scripts/embedded_sweep/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    print("RESULT " + json.dumps(res), flush=True)


def sweep(specs: dict, root: Path, parallel: int) -> None:
    root.mkdir(parents=True, exist_ok=True)

    def child(name: str, spec: dict, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, __file__, "--one", json.dumps(spec), str(root / name), *extra]
        with open(root / f"{name}{'.draw' if extra else ''}.log", "w") as f:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)

    variants = {}
    for name, spec in specs.items():
        key = tuple(str(spec.get(k)) for k in (*DATA_KEYS, "draw"))
        variants.setdefault(key, (name, spec))
    with ThreadPoolExecutor(parallel) as ex:
        list(ex.map(lambda item: child(*item, "--draw"), variants.values()))

    def run_one(item: tuple[str, dict]) -> None:
        name, spec = item
        t = time.time()
        p = child(name, spec)
        log = (root / f"{name}.log").read_text()
        line = next((x for x in log.splitlines() if x.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"spec": spec, "error": log[-1500:]}
        r.update(name=name, rc=p.returncode, elapsed=round(time.time() - t, 1))
        with open(root / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name} rc={p.returncode} " + " ".join(f"{k}={v:.3f}" for k, v in r.get("acc", {}).items()), flush=True)

    with ThreadPoolExecutor(parallel) as ex:
        list(ex.map(run_one, specs.items()))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(json.loads(sys.argv[2]), Path(sys.argv[3]), draw_only="--draw" in sys.argv[4:])
    elif len(sys.argv) in (3, 4):
        parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 4
        sweep(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), parallel)
    else:
        print(__doc__)
        raise SystemExit(2)
