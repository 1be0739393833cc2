"""python -m train_cuda.distill: L = (1 - a) * CE + a * MSE(teacher, LN(Proj(student))) on a teacher cache.

Several GPUs: `accelerate launch -m train_cuda.distill ...` (DDP; each rank reads its share of the batches).
"""

from __future__ import annotations

import argparse
import sys

from bonsai_mlx.align import FEAT_LOSSES
from train_cuda.trainer import add_common_args, train


def main(argv: list[str] | None = None) -> int:
    from bonsai_mlx.errors import friendly, glue_negative_lists

    ap = argparse.ArgumentParser(prog="python -m train_cuda.distill", description=__doc__)
    add_common_args(ap)
    ap.add_argument("--teacher-cache", required=True, help="made by python -m train_cuda.extract")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the feature loss")
    ap.add_argument("--alpha-end", type=float, help="alpha decays linearly to this")
    ap.add_argument(
        "--feat-loss", choices=FEAT_LOSSES, default="mse", help="distance to the teacher states (default mse)"
    )
    ap.add_argument("--layer-map", help="teacher:student layer pairs, e.g. -1:-1,16:12 (default: relative depth)")
    ap.add_argument("--kl", action="store_true", help="add logit KL (shared vocabulary; cache made with --kl-topk)")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--kl-temperature", type=float, default=1.0)
    a = ap.parse_args(glue_negative_lists(sys.argv[1:] if argv is None else argv, ("--layer-map",)))
    with friendly("distill"):
        train(a, distill=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
