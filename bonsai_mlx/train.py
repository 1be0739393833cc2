"""python -m bonsai_mlx.train: SFT (align / instruct / full) and distillation of a Pico in MLX.

With no arguments it runs the embedded default: a tiny Pico, built from scratch, learns the
built-in synthetic shapes task offline and reports held-out accuracy per question type.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bonsai_mlx.core.cli import add_options, given
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.runs import check_resume, read_state, resolve_checkpoint
from bonsai_mlx.core.train_config import CUDA_ONLY, TrainConfig
from bonsai_mlx.embedded import DEFAULT, DEFAULT_DATA


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m bonsai_mlx.train\n"
        "  python -m bonsai_mlx.train --model pico/ --data llava_instruct.json --image-root images/ "
        "--stage instruct --quantize-base 4\n  python -m bonsai_mlx.train --resume runs/pico\n"
        "  python -m bonsai_mlx.train --export sample_data/   # the synthetic task as LLaVA JSON + PNGs",
    )
    # every training option, its default and help come from TrainConfig; flags not given stay out of the
    # namespace, so a --config file or a resumed run's saved options sit underneath them
    add_options(ap, TrainConfig, suppress=True, exclude=CUDA_ONLY)
    ap.add_argument("--resume", help="continue a run exactly from its latest (or the given) checkpoint")
    ap.add_argument("--config", help="YAML/JSON file of these options (command-line flags override it)")
    ap.add_argument("--export", metavar="DIR", help="write the synthetic task as LLaVA JSON + PNGs and exit")
    ap.add_argument("--quick", action="store_true", help="embedded default, shortened (a smoke test)")
    return ap


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    d: dict = {}
    saved: dict | None = None
    if args.resume:
        ck = resolve_checkpoint(args.resume)
        state = read_state(ck)
        saved = dict(state["config"])
        if state.get("embedded"):  # the run fills these in itself; left filled, it would not know it is the default
            saved.update(model=None, data=None, eval_data=None, image_root=None)
            args.quick = args.quick or bool(state.get("quick"))
        d.update(saved)
    if args.config:
        import yaml

        p = Path(args.config)
        if not p.is_file():
            raise InputNotFound(f"{p}: no such config file")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: expected a mapping of option: value")
        d.update({k.replace("-", "_"): v for k, v in loaded.items()})
    flags = given(TrainConfig, args)
    if saved is not None:
        check_resume(ck, saved, {**d, **flags})  # one policy for every trainer: changed options are refused
    d.update(flags)
    if not args.resume and "model" not in d and "data" not in d:
        d = {**DEFAULT, **d}
        if args.quick:
            d.update(max_steps=50, warmup=10, eval_every=0, save_every=0, log_every=1)
            if "out" not in vars(args):
                d["out"] = "runs/shapes-quick"
    return TrainConfig.from_dict(d)


def main(argv: list[str] | None = None) -> int:
    from bonsai_mlx.core.errors import friendly, glue_negative_lists

    args = parser().parse_args(glue_negative_lists(sys.argv[1:] if argv is None else argv, ("--layer-map",)))

    with friendly("train"):
        if args.export:
            from bonsai_mlx.core.synthetic import export

            tr, ev = export(args.export, DEFAULT_DATA["n_train"] // 6, DEFAULT_DATA["n_eval"] // 2)
            print(f"wrote {tr} and {ev} (LLaVA format) with images in {Path(args.export) / 'images'}")
            return 0
        cfg = resolve_config(args)
        from bonsai_mlx.runner import run

        t = time.perf_counter()
        try:
            summary = run(cfg, resume=args.resume, quick=args.quick)
        except KeyboardInterrupt:
            return 130
        print(f"done in {time.perf_counter() - t:.0f} s")
        for line in summary:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
