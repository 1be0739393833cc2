"""python -m train_cuda.distill: L = (1 - a) * CE + a * MSE(teacher, LN(Proj(student))) on a teacher cache.

Several GPUs: `accelerate launch -m train_cuda.distill ...` (DDP; each rank reads its share of the batches).
"""

from __future__ import annotations

import argparse
import sys

from train_cuda.trainer import add_common_args, add_distill_args, train


def main(argv: list[str] | None = None) -> int:
    from bonsai_mlx.core.errors import friendly, glue_negative_lists

    ap = argparse.ArgumentParser(prog="python -m train_cuda.distill", description=__doc__)
    add_common_args(ap)
    add_distill_args(ap)
    a = ap.parse_args(glue_negative_lists(sys.argv[1:] if argv is None else argv, ("--layer-map",)))
    with friendly("distill"):
        train(a, distill=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
