"""python -m train_cuda.sft: Phase I (projector + LoRA, QLoRA NF4 on CUDA) with PyTorch.

Same options, defaults, learning-rate curve, checkpoints and resume policy as `python -m bonsai_mlx.train`.
"""

from __future__ import annotations

import sys

from train_cuda.trainer import config_from_args, parser, train


def main(argv: list[str] | None = None) -> int:
    from bonsai_mlx.core.errors import friendly

    args = parser("python -m train_cuda.sft", __doc__, distill=False).parse_args(argv)
    with friendly("sft"):
        train(config_from_args(args, distill=False), distill=False, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
