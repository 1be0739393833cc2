"""python -m bonsai_mlx.train: SFT (align / instruct / full) and distillation of a Pico in MLX.

With no arguments it runs the embedded default: a tiny Pico, built from scratch, learns the
built-in synthetic shapes task offline and reports held-out accuracy per question type.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from bonsai_mlx.core.align import FEAT_LOSSES
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.train_config import STAGES, TrainConfig
from bonsai_mlx.core.vocab_map import KL_MODES
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
    S = argparse.SUPPRESS
    ap.add_argument("--model", default=S, help="Pico directory or hub id to fine-tune")
    ap.add_argument("--data", default=S, help="LLaVA conversation JSON/JSONL, or a datasets directory / hub id")
    ap.add_argument("--image-root", default=S, help="folder the records' image paths are relative to")
    ap.add_argument(
        "--stage",
        choices=STAGES,
        default=S,
        help="align: projector only; instruct: projector + LoRA; full: everything; distill: + teacher loss",
    )
    ap.add_argument("--quantize-base", type=int, choices=[4, 8], default=S, help="freeze the LM in 4/8 bits (QLoRA)")
    ap.add_argument("--lora-rank", type=int, default=S)
    ap.add_argument("--lora-alpha", type=float, default=S)
    ap.add_argument("--lora-dropout", type=float, default=S)
    ap.add_argument("--lora-targets", default=S, help="comma list of LM projections (default: all seven)")
    ap.add_argument("--train-vision", action="store_true", default=S, help="also train the SigLIP tower")
    ap.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=S,
        help="frozen-weight/compute dtype (default float32 on CPU, bfloat16 on GPU); trainables are fp32",
    )
    ap.add_argument("--batch-size", type=int, default=S)
    ap.add_argument("--grad-accum", type=int, default=S)
    ap.add_argument("--lr", type=float, default=S)
    ap.add_argument("--warmup", type=int, default=S, help="linear warmup steps, then cosine decay")
    ap.add_argument("--weight-decay", type=float, default=S)
    ap.add_argument("--grad-clip", type=float, default=S)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--max-steps", type=int, default=S)
    g.add_argument("--epochs", type=float, default=S)
    ap.add_argument("--max-length", type=int, default=S, help="tokens per sample (longer ones are truncated, counted)")
    ap.add_argument(
        "--grad-checkpoint", action="store_true", default=S, help="recompute layers in backward: less memory"
    )
    ap.add_argument("--eval-data", default=S)
    ap.add_argument("--eval-every", type=int, default=S)
    ap.add_argument("--save-every", type=int, default=S)
    ap.add_argument("--log-every", type=int, default=S)
    ap.add_argument("--out", default=S, help="run directory (checkpoints, metrics.jsonl, final outputs)")
    ap.add_argument("--seed", type=int, default=S)
    ap.add_argument("--on-bad-sample", choices=["skip", "error"], default=S)
    ap.add_argument(
        "--teacher-cache",
        default=S,
        help="teacher hidden-state cache (train_cuda.extract): --stage distill, or any stage plus the teacher loss",
    )
    ap.add_argument("--alpha", type=float, default=S, help="distill: weight of the feature loss")
    ap.add_argument("--alpha-end", type=float, default=S, help="distill: alpha decays linearly to this")
    ap.add_argument("--layer-map", default=S, help="distill: teacher:student layer pairs, e.g. -1:-1,16:12")
    ap.add_argument("--feat-loss", choices=FEAT_LOSSES, default=S, help="distill: distance to the teacher states")
    ap.add_argument(
        "--kl",
        action="store_true",
        default=S,
        help="distill: add a logit loss to the teacher at aligned text units (cache made with --logits-topk); "
        "across vocabularies it picks a cross-tokenizer --kl-mode and says which",
    )
    ap.add_argument(
        "--kl-mode",
        choices=KL_MODES,
        default=S,
        help="distill: same-vocab (KL on token ids), uld (sorted-probability L1, any tokenizers), shared-vocab "
        "(KL over tokens with equal strings), auto (default: pick from the cache); a mode implies --kl",
    )
    ap.add_argument("--kl-weight", type=float, default=S, help="distill: weight of the KL term (default 1)")
    ap.add_argument("--kl-temperature", type=float, default=S, help="distill: softmax temperature (default 1)")
    ap.add_argument("--resume", help="continue a run exactly from its latest (or the given) checkpoint")
    ap.add_argument("--config", help="YAML/JSON file of these options (command-line flags override it)")
    ap.add_argument("--export", metavar="DIR", help="write the synthetic task as LLaVA JSON + PNGs and exit")
    ap.add_argument("--quick", action="store_true", help="embedded default, shortened (a smoke test)")
    return ap


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    d: dict = {}
    if args.resume:
        from bonsai_mlx.checkpoint import resolve_checkpoint

        state = json.loads((resolve_checkpoint(args.resume) / "state.json").read_text())
        d.update(state["config"])
        if state.get("embedded"):  # the run fills these in itself; left filled, it would not know it is the default
            d.update(model=None, data=None, eval_data=None, image_root=None)
            args.quick = args.quick or bool(state.get("quick"))
    if args.config:
        import yaml

        p = Path(args.config)
        if not p.is_file():
            raise InputNotFound(f"{p}: no such config file")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: expected a mapping of option: value")
        d.update({k.replace("-", "_"): v for k, v in loaded.items()})
    names = {f.name for f in fields(TrainConfig)}
    d.update({k: v for k, v in vars(args).items() if k in names})
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
