"""python -m train_cuda.sft: Phase I (projector + LoRA, QLoRA NF4 on CUDA) with PyTorch."""

from __future__ import annotations

import argparse
import sys

from train_cuda.trainer import add_common_args, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train_cuda.sft", description=__doc__)
    add_common_args(ap)
    a = ap.parse_args(argv)
    from bonsai_mlx.core.errors import friendly

    with friendly("sft"):
        train(a, distill=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
