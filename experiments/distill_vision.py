"""python -m experiments.distill_vision: the evidence for `bonsai_mlx.distill_vision`.

`miniature`: the embedded default's model (trained here with `python -m bonsai_mlx.train`) is the teacher;
its SigLIP tower is distilled into smaller ones on the task's training images (no labels), each student is
scored as distilled, then healed with a short `--stage align` run (projector only, fused back with
`convert fuse`'s code) and scored again; the teacher gets the same heal as a control. Held-out exact match
per question type (bonsai_mlx.embedded's accuracy): results.json and table.md under --out.

`ttft`: the full-size Pico shapes with random weights (bonsai_mlx.bench's `--random pico`) and students cut
from its tower (`distill_vision --steps 0`: the initialised student, same shapes as a trained one); time to
first token (bench's MLX worker, each model in its own process, rounds interleaved so load drifts hit all
alike) and the vision tower alone, side by side in one run.

Each training, distilling and scoring command is a step (experiments/steps.py: logs/<step>.log under --out); a
rerun skips the finished ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bonsai_mlx.core.io import atomic_write_text
from experiments.steps import Steps

TYPES = ("colour", "count", "position", "shape", "yesno")
# name -> distill_vision flags. The embedded tower: 3 layers, width 128, 4 heads of 32, MLP 512.
MINI_STUDENTS = {
    "L2": ["--layers", "2"],
    "L2-random": ["--layers", "2", "--init", "random"],
    "W64": ["--width", "64"],
    "W64-random": ["--width", "64", "--init", "random"],
    "L1-W64": ["--layers", "1", "--width", "64"],
}
# SigLIP-B/16-224: 12 layers, width 768, 12 heads of 64, MLP 3072.
FULL_STUDENTS = {
    "L6": ["--layers", "6"],
    "W512": ["--width", "512"],
    "L6-W512": ["--layers", "6", "--width", "512"],
}


def _score(steps: Steps, model: Path, data: Path, out: Path) -> dict:
    """Held-out exact match per question type (bonsai_mlx.embedded score), kept in `out`."""
    args = ["score", str(model), str(data / "eval.json"), "--image-root", str(data / "images"), "--out", str(out)]
    steps.run(str(out.relative_to(steps.root).with_suffix("")), "bonsai_mlx.embedded", *args, done=out)
    return json.loads(out.read_text())


def _heal(steps: Steps, model: Path, data: Path, work: Path, n: int, lr: float, batch: int = 32) -> Path:
    """A short align run (projector only, `n` steps) on the task's training data, fused into a full checkpoint."""
    healed = work / "healed"

    def heal(log: Path) -> None:
        opts = {"group_by_length": False, "max_length": 128, "eval_every": 0, "save_every": 0, "log_every": 20}
        atomic_write_text(work / "heal.json", json.dumps(opts))
        args = ["--model", str(model), "--data", str(data / "train.json"), "--image-root", str(data / "images")]
        args += ["--stage", "align", "--max-steps", str(n), "--batch-size", str(batch), "--lr", str(lr)]
        args += ["--warmup", "20", "--out", str(work / "heal"), "--config", str(work / "heal.json")]
        steps.command(log, "bonsai_mlx.train", *args)
        from bonsai_mlx.conversion.fuse import fuse

        fuse(model, work / "heal", healed)

    steps.step(f"{work.relative_to(steps.root)}/heal", heal, done=healed / "config.json", clear=[healed])
    return healed


def miniature(a: argparse.Namespace) -> dict:
    out = Path(a.out)
    steps = Steps(out, "distill_vision")
    teacher_run = out / "teacher"
    data = teacher_run / "data"
    teacher = teacher_run / "model"
    steps.say(f"the teacher: the embedded default, {a.teacher_steps} steps")
    args = ["--out", str(teacher_run), "--max-steps", str(a.teacher_steps), "--eval-every", "0", "--seed", str(a.seed)]
    steps.run("teacher", "bonsai_mlx.train", *args, done=teacher / "config.json")
    results: dict = {"setup": vars(a), "rows": {}}
    steps.say("scoring the teacher, then healing it the same way as a control")
    distilled = _score(steps, teacher, data, out / "teacher_acc.json")
    healed = _heal(steps, teacher, data, out / "teacher-heal", a.heal_steps, a.heal_lr)
    results["rows"]["teacher"] = {
        "distilled": distilled,
        "healed": _score(steps, healed, data, out / "teacher_healed_acc.json"),
    }
    for name in a.students.split(","):
        if name not in MINI_STUDENTS:
            raise SystemExit(f"--students: unknown {name!r} (choose from {', '.join(MINI_STUDENTS)})")
        work = out / name
        student = work / "distilled"
        steps.say(f"{name}: distilling ({' '.join(MINI_STUDENTS[name])}, {a.distill_steps} steps)")
        args = ["--teacher", str(teacher), "--images", str(data / "train.json"), "--image-root", str(data / "images")]
        args += ["--out", str(student), "--steps", str(a.distill_steps), "--batch-size", "64"]
        args += ["--lr", str(a.distill_lr), "--seed", str(a.seed), "--save-every", "0", *MINI_STUDENTS[name]]
        steps.run(f"{name}/distill", "bonsai_mlx.distill_vision", *args, done=student / "config.json")
        report = json.loads((student / "distill_vision.json").read_text())
        steps.say(f"{name}: scoring, healing ({a.heal_steps} align steps), scoring")
        results["rows"][name] = {
            "report": report,
            "distilled": _score(steps, student, data, work / "acc_distilled.json"),
            "healed": _score(
                steps, _heal(steps, student, data, work, a.heal_steps, a.heal_lr), data, work / "acc_healed.json"
            ),
        }
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    teacher_params = next(iter(r["report"] for n, r in results["rows"].items() if "report" in r), {}).get(
        "teacher_tower_parameters"
    )
    results["teacher_tower_parameters"] = teacher_params
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    table = mini_table(results)
    atomic_write_text(out / "table.md", table + "\n")
    print(table)
    return results


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def mini_table(results: dict) -> str:
    tp = results.get("teacher_tower_parameters")
    lines = [
        "| tower | init | vision params | held-out feature match (rel. MSE / cosine): init → distilled |",
        "|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        if "report" not in r:
            lines.append(f"| teacher | - | {tp:,} (100%) | - |" if tp else "| teacher | - | - | - |")
            continue
        rep = r["report"]
        b, f = rep["feature_match_at_init"], rep["feature_match_final"]
        n = rep["student_tower_parameters"]
        lines.append(
            f"| {name} | {'; '.join(rep['init'])} | {n:,} ({n / rep['teacher_tower_parameters']:.0%}) "
            f"| {b['rel_mse']:.3f} / {b['cosine']:.3f} → {f['rel_mse']:.3f} / {f['cosine']:.3f} |"
        )
    lines += [
        "",
        "| tower | stage | overall | " + " | ".join(TYPES) + " |",
        "|---|---|---|" + "---|" * len(TYPES),
    ]
    for name, r in results["rows"].items():
        for stage in ("distilled", "healed"):
            acc = r[stage]
            label = ("as trained" if stage == "distilled" else "+ same heal") if name == "teacher" else stage
            cells = [_pct(acc.get("overall"))] + [_pct(acc.get(t)) for t in TYPES]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- full-size TTFT -------------------------------------------------------------------------------
def tower_time(model_dir: str, repeats: int = 5) -> dict:
    """Median seconds of the vision tower + projector on one 224px image (after a warm-up), in this process."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from bonsai_mlx.bench import bench_image, peak_rss_gb
    from bonsai_mlx.generate import load

    model, proc = load(model_dir)
    px = mx.array(proc.pixel_values([bench_image()]))
    mx.eval(model.image_features(px))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(model.image_features(px))
        times.append(time.perf_counter() - t)
    params = sum(v.size for _, v in tree_flatten(model.vision_tower.parameters()))
    return {"tower_s": statistics.median(times), "vision_params": params, "peak_gb": peak_rss_gb()}


def ttft(a: argparse.Namespace) -> dict:
    from bonsai_mlx.bench import bench_image, random_pico, spawn

    out = Path(a.out)
    steps = Steps(out, "distill_vision")
    base = random_pico()
    imgs = out / "images"
    if not imgs.is_dir():
        imgs.mkdir(parents=True)
        for i in range(8):  # only used to pick channels and fit the map of the initialised students
            bench_image().rotate(45 * i).save(imgs / f"{i}.png")
    models = {"teacher (SigLIP-B/16, 12 layers)": base}
    for name, flags in FULL_STUDENTS.items():
        d = out / name
        steps.say(f"{name}: cutting the student from the random teacher ({' '.join(flags)})")
        args = ["--teacher", str(base), "--images", str(imgs), "--out", str(d), "--steps", "0", "--batch-size", "8"]
        steps.run(name, "bonsai_mlx.distill_vision", *args, "--save-every", "0", *flags, done=d / "config.json")
        models[name] = d
    rows: dict[str, dict] = {n: {"ttft": [], "tower": []} for n in models}
    for r in range(a.rounds):
        for n, d in models.items():
            steps.say(f"round {r + 1}/{a.rounds}: {n}")
            res = spawn("mlx", d, a.tokens)
            if "error" in res:
                raise SystemExit(f"{n}: bench worker failed: {res['error']}")
            rows[n]["ttft"].append(res["ttft_s"])
            rows[n]["prompt_tokens"] = res["prompt_tokens"]
            rows[n]["peak_gb"] = res["peak_gb"]
            t = steps.command(steps.log_path("tower-time"), "experiments.distill_vision", "tower-time", str(d))
            if t is None:
                raise SystemExit(f"{n}: tower-time printed no result (log: {steps.log_path('tower-time')})")
            rows[n]["tower"].append(t["tower_s"])
            rows[n]["vision_params"] = t["vision_params"]
        results = {"setup": vars(a), "rounds_done": r + 1, "rows": rows}  # written every round: a cut run keeps them
        atomic_write_text(out / "ttft.json", json.dumps(results, indent=2))
        table = ttft_table(rows)
        atomic_write_text(out / "ttft.md", table + "\n")
    print(table)
    return results


def ttft_table(rows: dict) -> str:
    names = list(rows)
    ref = rows[names[0]]
    rt, rv = statistics.median(ref["ttft"]), statistics.median(ref["tower"])
    lines = [
        "| vision tower | vision params | TTFT s (median) | TTFT vs teacher | tower + projector s | tower vs teacher "
        "| peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = rows[n]
        t, v = statistics.median(r["ttft"]), statistics.median(r["tower"])
        lines.append(
            f"| {n} | {r['vision_params'] / 1e6:.1f}M ({r['vision_params'] / ref['vision_params']:.0%}) | {t:.2f} "
            f"| {t / rt:.2f}x | {v:.3f} | {v / rv:.2f}x | {r['peak_gb']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.distill_vision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("miniature", help="accuracy before/after in the embedded task (table.md under --out)")
    m.add_argument("--out", default="runs/distill-vision")
    m.add_argument("--teacher-steps", type=int, default=800, help="embedded default's steps for the teacher")
    m.add_argument("--distill-steps", type=int, default=150)
    m.add_argument("--distill-lr", type=float, default=1e-3)
    m.add_argument("--heal-steps", type=int, default=150)
    m.add_argument("--heal-lr", type=float, default=1e-3)
    m.add_argument("--students", default="L2,L2-random,W64,W64-random", help=f"any of {', '.join(MINI_STUDENTS)}")
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("ttft", help="TTFT and tower time of full-size shapes, random weights (ttft.md under --out)")
    t.add_argument("--out", default="runs/distill-vision-ttft")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--tokens", type=int, default=4, help="forced new tokens per run (TTFT is what is measured)")
    w = sub.add_parser("tower-time", help=argparse.SUPPRESS)
    w.add_argument("model")
    a = ap.parse_args(argv)
    if a.cmd == "tower-time":
        print(json.dumps(tower_time(a.model)))
        return 0
    (miniature if a.cmd == "miniature" else ttft)(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
