"""`bonsai COMMAND ...` (also `python -m bonsai_mlx COMMAND ...`): every tool of the project under one name.

Each command is the module's own CLI (`bonsai train --help` = `python -m bonsai_mlx.train --help`); the
`python -m` forms keep working.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module whose main(argv) it runs, one line for `bonsai --help`)
COMMANDS = {
    "train": ("bonsai_mlx.train", "train a Pico in MLX (no arguments: the built-in tiny Pico, offline)"),
    "generate": ("bonsai_mlx.generate", "one streamed answer about an image"),
    "chat": ("bonsai_mlx.chat", "a conversation in the terminal"),
    "app": ("bonsai_mlx.app.__main__", "the local Gradio chat over images"),
    "serve": ("bonsai_mlx.server", "an OpenAI-compatible chat API"),
    "convert": ("bonsai_mlx.convert.__main__", "to-mlx | to-hf | init | fuse | to-gguf"),
    "evaluate": ("bonsai_mlx.evaluate", "batched answers and their scores per question type"),
    "prune": ("bonsai_mlx.prune", "structured pruning of the LM"),
    "distill-vision": ("bonsai_mlx.distill_vision", "a smaller vision tower distilled from the model's own"),
    "frontier": ("bonsai_mlx.frontier", "quality vs speed vs memory of quantized and pruned variants"),
    "bench": ("bonsai_mlx.bench", "inference speed and memory, side by side with other engines"),
    "bench-train": ("bonsai_mlx.bench_train", "training speed and memory"),
    "extract": ("train_cuda.extract", "CUDA: the teacher's hidden states into a cache"),
    "sft": ("train_cuda.sft", "CUDA: QLoRA instruction tuning"),
    "distill": ("train_cuda.distill", "CUDA: QLoRA distillation (teacher online or from a cache)"),
    "gpu-check": ("train_cuda.gpu_check", "CUDA: the tests and the benchmark in one report"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: bonsai COMMAND [--help | options]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bonsai: unknown command {name!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"bonsai {name}", *rest]  # mains that read sys.argv (negative-number lists) see the same words
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
