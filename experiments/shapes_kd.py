"""python -m experiments.shapes_kd: does distilling a bigger teacher help a tiny Pico? In miniature.

1. Draws the embedded synthetic shapes task (bonsai_mlx.core.synthetic).
2. Builds a teacher of the LLaVA-1.5 shape (CLIP vision with its own 6x6 grid, Llama LM, its own Unigram
   tokenizer and Vicuna prompt) and trains it on all the training data (PyTorch).
3. Extracts its hidden states at the units aligned to the student (train_cuda.extract: the same code and
   cache as for LLaVA-1.5-7B).
4. Trains the embedded default's tiny Pico from scratch on a small share of the data, one run per arm and
   seed, same steps (bonsai_mlx.train, MLX, run as its own process: as on real hardware, the PyTorch side and
   the MLX side never share one). Arms (`--arms`):
       ce            CE only (a = 0)
       feat          + the hidden-state loss (a > 0)                                  ("distill" also names it)
       feat+uld      + the feature loss and ULD logits (sorted probabilities, any tokenizers)
       feat+shared   + the feature loss and KL over the tokens both vocabularies share
   The teacher has its own tokenizer, so the logit arms are the cross-tokenizer modes of issue 17.
   Phase II arms continue each seed's CE student in PyTorch (train_cuda.distill: projector + LoRA, feature loss),
   as a student is improved on a rented GPU, with the teacher's targets from either source:
       kd-cache      from the cache that step 3 extracted
       kd-online     from the teacher itself, run inside each step (--teacher): the same targets, no cache
5. Reports held-out greedy exact match of the teacher and of every student, overall and per question type,
   mean ± sd over seeds: results.json and results.md.
Each part is a step (experiments/steps.py: logs/<step>.log under --out); a rerun skips the finished ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bonsai_mlx.core.cli import add_options, from_args, opt
from bonsai_mlx.core.synthetic import DEFAULT_DATA
from experiments.steps import Steps, say


@dataclass
class Setup:
    out: str = "runs/shapes-kd"
    n_train: int = 12000  # the teacher learns from all of it
    share: float = 0.1  # the students see this first share of it
    n_eval: int = 400
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_vision_hidden: int = 64
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    student_steps: int = 600
    student_lr: float = 1e-3
    batch_size: int = 32
    alpha: float = 0.5
    layers: str = opt("-1,2", "teacher hidden_states taken (the student gets the same relative depths)")
    aspect: str = opt(
        "mixed",
        "mixed: images stretched to 2:1 and 1:2 in turn (the geometry real photos have)",
        choices=("mixed", "square"),
    )
    seeds: list[int] = opt([0, 1, 2], cli=False)
    arms: list[str] = opt(["ce", "feat", "feat+uld", "feat+shared"], cli=False)
    logits_topk: int = opt(32, "teacher logits stored per aligned unit (logit arms)")
    kl_weight: float = opt(1.0, "weight of the logit term (logit arms)")
    kd_steps: int = opt(200, "kd arms: train_cuda.distill steps after the CE student's")
    kd_lr: float = opt(1e-3, "kd arms: LoRA learning rate (the projector's is 0.1 x, as LLaVA sets it)")


# arm -> (distils from the cache, --kl-mode of its logit term or None); "distill" is the old name of "feat"
ARMS = {"ce": (False, None), "feat": (True, None), "feat+uld": (True, "uld"), "feat+shared": (True, "shared-vocab")}
ARM_NAMES = {"ce": "CE only", "feat": "hidden states", "feat+uld": "+ ULD logits", "feat+shared": "+ shared-vocab KL"}
# Phase II arms (train_cuda.distill from the CE student of the same seed): arm -> where the teacher's targets come from
KD_ARMS = {"kd-cache": "cache", "kd-online": "online"}
ARM_NAMES |= {"kd-cache": "CE, then KD from the cache", "kd-online": "CE, then KD, teacher online"}
QUICK_ARMS = ["ce", "feat+shared"]  # the smoke run: one logit arm (it runs the feature loss too), CI-sized


def parse_arms(spec: str) -> list[str]:
    """ "ce,feat,feat+uld" -> the arms, in order; unknown names are refused naming the valid ones."""
    from bonsai_mlx.core.errors import UserError

    arms = ["feat" if a.strip() == "distill" else a.strip() for a in spec.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS and a not in KD_ARMS]
    if bad or not arms:
        names = ", ".join([*ARMS, *KD_ARMS])
        raise UserError(f"--arms: unknown arm {bad[0] if bad else spec!r}; choose from {names}")
    if any(a in KD_ARMS for a in arms) and "ce" not in arms:
        raise UserError("--arms: the kd arms continue the CE student of each seed; add ce")
    # the kd arms continue each seed's CE student, so they run after every other arm
    return sorted(dict.fromkeys(arms), key=lambda a: a in KD_ARMS)


def run(s: Setup) -> dict:
    from bonsai_mlx.core.io import atomic_write_text

    out = Path(s.out)
    data, teacher, init, cache = out / "data", out / "teacher", out / "student-init", out / "cache"
    images = str(data / "images")
    steps = Steps(out, "shapes_kd")
    steps.step("data", lambda log: draw(s, data), done=data / "eval.json")
    if s.aspect == "mixed":
        steps.step("non-square", lambda log: make_non_square(data), done=data / "non_square.json")
    train = json.loads((data / "train.json").read_text())
    held = json.loads((data / "eval.json").read_text())
    small = data / "student_share.json"
    atomic_write_text(small, json.dumps(train[: max(1, int(len(train) * s.share))]))

    steps.step("teacher", lambda log: train_teacher(s, teacher, train, held, images), done=teacher / "trained.json")
    teacher_acc = json.loads((teacher / "trained.json").read_text())["heldout_exact_match"]
    steps.say(f"teacher held-out exact match: {teacher_acc:.1%}")

    size = str(DEFAULT_DATA["image_size"])
    steps.run("student-init", "bonsai_mlx.embedded", "init", str(init), "--image-size", size, clear=[init])
    logits = any(ARMS[a][1] for a in s.arms if a in ARMS)
    made = cache / "manifest.json"
    if logits and "extract" in steps.state and made.is_file() and not json.loads(made.read_text()).get("logits"):
        steps.say("extract: the cache holds no teacher logits and a logit arm needs them: extracting again")
        del steps.state["extract"]
    steps.step("extract", lambda log: extract(s, teacher, small, images, init, cache, logits), clear=[cache])
    rows = []
    for seed in s.seeds:
        for arm in s.arms:
            run_dir = out / f"{arm}-seed{seed}"
            if arm in KD_ARMS:
                base = out / f"ce-seed{seed}" / "model"
                kd = _kd_args(s, base, small, images, run_dir / "train", seed, KD_ARMS[arm], cache, teacher)
                fuse = ["fuse", str(base), str(run_dir / "train"), str(run_dir / "model")]
                score = ["score", str(run_dir / "model"), str(data / "eval.json"), "--image-root", images]
                score += ["--out", str(run_dir / "heldout.json")]

                def phase2(log: Path, kd=kd, fuse=fuse, score=score) -> None:
                    steps.command(log, "train_cuda.distill", *kd)
                    steps.command(log, "bonsai_mlx.convert", *fuse)
                    steps.command(log, "bonsai_mlx.embedded", *score)

                steps.step(f"{arm}-seed{seed}", phase2, done=run_dir / "heldout.json", clear=[run_dir])
                rows.append({"arm": arm, "seed": seed, **json.loads((run_dir / "heldout.json").read_text())})
                continue
            args = _student_args(s, init, small, images, run_dir, seed, cache if ARMS[arm][0] else None, ARMS[arm][1])
            score = ["score", str(run_dir / "model"), str(data / "eval.json"), "--image-root", images]
            score += ["--out", str(run_dir / "heldout.json")]

            def student(log: Path, args=args, score=score) -> None:
                steps.command(log, "bonsai_mlx.train", *args)
                steps.command(log, "bonsai_mlx.embedded", *score)

            steps.step(f"{arm}-seed{seed}", student, done=run_dir / "heldout.json")
            rows.append({"arm": arm, "seed": seed, **json.loads((run_dir / "heldout.json").read_text())})
    summary = {"setup": asdict(s), "teacher": teacher_acc, "runs": rows, "layer_map": _layer_map(cache, init)}
    if logits:
        summary["logits"] = _logit_note(cache, init)
    kd = [a for a in s.arms if a in KD_ARMS]
    if kd:
        summary["kd_tokens_per_s"] = {a: [_speed(out / f"{a}-seed{seed}" / "train") for seed in s.seeds] for a in kd}
    for arm in s.arms:
        mine = [r for r in rows if r["arm"] == arm]
        types = sorted({k for r in mine for k in r if k not in ("arm", "seed", "overall")})
        summary[arm] = {**_stats([r["overall"] for r in mine]), "by_type": {}}
        for t in types:
            summary[arm]["by_type"][t] = _stats([r[t] for r in mine if t in r])
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", report(summary))
    return summary


def draw(s: Setup, data: Path) -> dict:
    """The task's training and held-out samples, drawn once."""
    from bonsai_mlx.core import synthetic

    synthetic.export(data, s.n_train, s.n_eval, seed=0, size=DEFAULT_DATA["image_size"])
    return {"train": s.n_train, "eval": s.n_eval}


def train_teacher(s: Setup, teacher: Path, train: list[dict], held: list[dict], images: str) -> dict:
    """The LLaVA-1.5-shaped teacher, trained on all the training data; its held-out accuracy in trained.json."""
    from bonsai_mlx.core import synthetic
    from bonsai_mlx.core.io import atomic_write_text
    from experiments import tiny_teacher

    tiny_teacher.build(
        teacher,
        synthetic.corpus(),
        hidden=s.teacher_hidden,
        layers=s.teacher_layers,
        vision_hidden=s.teacher_vision_hidden,
        image_size=DEFAULT_DATA["image_size"],
        patch_size=8,
        vocab_size=400,
        init_std=0.08,  # as the student's: 0.02 is sized for wide models (see bonsai_mlx.embedded)
    )
    log = lambda m: say("shapes_kd", m)  # noqa: E731
    log(f"training the teacher ({s.teacher_steps} steps on {len(train)} samples)")
    tiny_teacher.train(teacher, train, images, s.teacher_steps, s.batch_size, s.teacher_lr, log=log)
    result = {"heldout_exact_match": tiny_teacher.accuracy(teacher, held, images)}
    atomic_write_text(teacher / "trained.json", json.dumps(result))
    return result


def extract(s: Setup, teacher: Path, small: Path, images: str, init: Path, cache: Path, logits: bool) -> dict:
    """The teacher's states at the units aligned to the student, for the students' share (train_cuda.extract)."""
    from train_cuda.extract import main

    main(
        ["--teacher", str(teacher), "--data", str(small), "--image-root", images, "--student-tokenizer", str(init)]
        + [f"--layers={s.layers}", "--out", str(cache), "--batch-size", "16"]
        + (["--logits-topk", str(s.logits_topk)] if logits else [])
    )
    return {}


def make_non_square(data: Path) -> dict:
    """Stretch every drawn (square) image to 2:1 or 1:2 in turn. The answers stay true (colours, counts and
    left/right/top/bottom survive a stretch), and the teacher (padding) and the student (stretching) now see
    the image differently, as with real photos. Noted in data/non_square.json."""
    from PIL import Image

    from bonsai_mlx.core.io import atomic_write_text

    paths = sorted((data / "images").glob("*.png"))
    for i, p in enumerate(paths):
        im = Image.open(p).convert("RGB")
        w, h = im.size
        if w != h:
            continue
        im.resize((2 * w, h) if i % 2 == 0 else (w, 2 * h), Image.BICUBIC).save(p)
    atomic_write_text(data / "non_square.json", json.dumps({"images": len(paths)}))
    return {"images": len(paths)}


def _layer_map(cache: Path, init: Path) -> str:
    """The teacher:student pairs the distilled students trained with (relative depth from the cache)."""
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.distill_targets import cache_layer_map
    from bonsai_mlx.core.teacher_cache import CacheReader

    pairs = cache_layer_map(None, CacheReader(cache), PicoConfig.load(init).text.num_hidden_layers)
    return ",".join(f"{t}:{s}" for t, s in pairs)


def _mean(xs: list) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def _stats(accs: list[float]) -> dict:
    """mean, sd (population, over the seeds) and each value."""
    return {"mean": statistics.mean(accs), "stdev": statistics.pstdev(accs), "each": accs}


def _logit_note(cache: Path, init: Path) -> str:
    """What the shared-vocab arm keeps of the teacher: shared tokens and the top-k mass on them."""
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.distill_targets import plan_logits
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.core.teacher_cache import CacheReader

    proc = Processor(init, PicoConfig.load(init))
    p = plan_logits(CacheReader(cache), proc.tokenizer, "shared-vocab")
    note = (
        f"the vocabularies share {len(p.shared):,} tokens ({p.shared.coverage:.1%} of the teacher's text tokens), "
        f"which keep {p.coverage:.1%} of the teacher's top-k probability mass"
    )
    return note + (f" (the top-k hold {p.topk_mass:.1%} of its whole distribution)" if p.topk_mass else "")


def _student_args(
    s: Setup, init: Path, data: Path, images: str, run_dir: Path, seed: int, cache, kl_mode: str | None = None
) -> list[str]:
    """`bonsai_mlx.train`'s arguments for one student: the embedded Pico from scratch, one arm, one seed."""
    args = ["--model", str(init), "--data", str(data), "--image-root", images, "--stage", "full"]
    args += ["--max-steps", str(s.student_steps), "--batch-size", str(s.batch_size), "--lr", str(s.student_lr)]
    args += ["--warmup", str(max(1, s.student_steps // 10)), "--seed", str(seed), "--out", str(run_dir)]
    args += ["--save-every", "0", "--eval-every", "0", "--log-every", "20", "--lora-dropout", "0"]
    if cache is not None:
        args += ["--teacher-cache", str(cache), "--alpha", str(s.alpha)]
    if kl_mode is not None:
        args += ["--kl-mode", kl_mode, "--kl-weight", str(s.kl_weight)]
    return args


def _kd_args(
    s: Setup, base: Path, data: Path, images: str, out: Path, seed: int, source: str, cache: Path, teacher: Path
) -> list[str]:
    """`train_cuda.distill`'s arguments for one Phase II arm: the seed's CE student, projector + LoRA, the feature
    loss (alpha), the teacher's targets from the cache or from the teacher online."""
    args = ["--student", str(base), "--data", str(data), "--image-root", images, "--out", str(out)]
    args += ["--max-steps", str(s.kd_steps), "--batch-size", str(s.batch_size), "--lr", str(s.kd_lr)]
    args += ["--warmup", str(max(1, s.kd_steps // 10)), "--seed", str(seed), "--alpha", str(s.alpha)]
    args += ["--lora-rank", "16", "--lora-dropout", "0", "--no-group-by-length", "--dtype", "float32"]
    args += ["--save-every", "0", "--log-every", "20"]
    if source == "cache":
        return [*args, "--teacher-cache", str(cache)]
    return [*args, "--teacher", str(teacher), f"--teacher-layers={s.layers}"]


def _speed(train_dir: Path) -> float | None:
    """A train_cuda run's training tokens per second over the whole run (its last metrics row)."""
    path = train_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return rows[-1].get("tokens_per_s") if rows else None


def report(summary: dict) -> str:
    s = summary["setup"]
    n_small = int(s["n_train"] * s["share"])
    lines = [
        "# Distillation in miniature (experiments.shapes_kd)",
        "",
        f"Teacher (LLaVA-1.5 shape: CLIP 6x6 grid + Llama {s['teacher_layers']}x{s['teacher_hidden']}, own "
        f"tokenizer) trained on {s['n_train']} samples: held-out exact match **{summary['teacher']:.1%}**.",
        f"Students: the embedded default's tiny Pico from scratch on {n_small} samples, {s['student_steps']} "
        f"steps, batch {s['batch_size']}; distilled with alpha {s['alpha']} on teacher layers {s['layers']} "
        f"(student layers at the same relative depth: {summary.get('layer_map', '?')}).",
        f"Images: {'stretched to 2:1 and 1:2 in turn' if s.get('aspect') == 'mixed' else 'square'} (teacher pads "
        "to a square, student stretches; targets pooled by region).",
    ]
    arms = s.get("arms", ["ce", "feat"])
    if any(a in KD_ARMS for a in arms):
        lines.append(
            f"KD arms: each seed's CE student, then {s.get('kd_steps')} steps of train_cuda.distill (PyTorch, "
            f"projector + LoRA r=16, lr {s.get('kd_lr')}, feature loss alpha {s['alpha']}) on the same share, "
            "with the teacher's targets from the cache or computed online by the teacher in each step "
            "(training tokens/s, mean over seeds: "
            + ", ".join(f"{a} {_mean(v):,.0f}" for a, v in summary.get("kd_tokens_per_s", {}).items())
            + ")."
        )
    if any(ARMS[a][1] for a in arms if a in ARMS):
        lines.append(
            f"Logit arms: + {s.get('kl_weight', 1.0)} x the logit loss on the teacher's top-{s.get('logits_topk')} "
            f"at aligned text units and answer starts; {summary.get('logits', '')}."
        )
    lines += [
        "",
        "Held-out exact match, overall:",
        "",
        "| seed | " + " | ".join(ARM_NAMES[a] for a in arms) + " |",
        "|---" * (len(arms) + 1) + "|",
    ]
    by = {(r["arm"], r["seed"]): r["overall"] for r in summary["runs"]}
    for seed in s["seeds"]:
        lines.append(f"| {seed} | " + " | ".join(f"{by[(a, seed)]:.1%}" for a in arms) + " |")
    pm = lambda x: f"{x['mean']:.1%} ± {x['stdev']:.1%}"  # noqa: E731
    lines.append("| mean ± sd | " + " | ".join(pm(summary[a]) for a in arms) + " |")
    types = sorted({t for a in arms for t in summary[a].get("by_type", {})})
    if types:
        lines += ["", "Per question type, mean ± sd over seeds:", ""]
        lines += ["| type | " + " | ".join(ARM_NAMES[a] for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for t in types:
            cells = [pm(summary[a]["by_type"][t]) if t in summary[a]["by_type"] else "-" for a in arms]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.shapes_kd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(ap, Setup)
    ap.add_argument("--seeds", default=None, help="comma list of student seeds (default 0,1,2; --quick: 0)")
    ap.add_argument(
        "--arms",
        default=None,
        help=f"comma list of student arms from {', '.join([*ARMS, *KD_ARMS])} (default: {', '.join(ARMS)}; the kd "
        f"arms on request, with ce; --quick: {','.join(QUICK_ARMS)})",
    )

    ap.add_argument("--quick", action="store_true", help="a minute-long smoke run (numbers mean nothing)")
    from bonsai_mlx.core.errors import friendly, glue_negative_lists

    a = ap.parse_args(glue_negative_lists(sys.argv[1:] if argv is None else argv, ("--layers",)))

    s = from_args(Setup, a)
    if a.quick:
        s.n_train, s.n_eval, s.teacher_steps, s.student_steps, s.seeds = 200, 20, 4, 4, [0]
        s.teacher_hidden, s.teacher_vision_hidden, s.teacher_layers, s.share = 32, 32, 2, 0.5
        s.layers, s.logits_topk, s.kd_steps = "-1,1", 8, 4
    if a.seeds is not None:
        s.seeds = [int(x) for x in a.seeds.split(",") if x]
    with friendly("shapes_kd"):
        s.arms = parse_arms(a.arms) if a.arms else (list(QUICK_ARMS) if a.quick else list(ARMS))
        summary = run(s)
    print(report(summary))
    print(f"results: {Path(s.out) / 'results.json'}, {Path(s.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
