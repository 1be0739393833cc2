"""python -m train_cuda.distill: L = (1 - a) * CE + a * MSE(teacher, LN(Proj(student))) on a teacher cache.

Several GPUs: `accelerate launch -m train_cuda.distill ...` (DDP; each rank reads its share of the batches).
"""

from __future__ import annotations

import sys

from train_cuda.trainer import config_from_args, parser, train


def main(argv: list[str] | None = None) -> int:
    from bonsai_mlx.core.errors import friendly, glue_negative_lists

    ap = parser("python -m train_cuda.distill", __doc__, distill=True)
    flags = ("--layer-map", "--teacher-layers")
    args = ap.parse_args(glue_negative_lists(sys.argv[1:] if argv is None else argv, flags))
    with friendly("distill"):
        train(config_from_args(args, distill=True), distill=True, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
