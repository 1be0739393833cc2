"""bonsai app (python -m bonsai_mlx.app): chat with a local Pico over images, in the browser, offline."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bonsai app", description=__doc__)
    ap.add_argument("--model", help="a model directory (default: runs/shapes/model, then ./models/*)")
    ap.add_argument("--models-dir", help="a folder of model directories to choose from (float and quantized)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    from bonsai_mlx.core.cli import add_options, from_args
    from bonsai_mlx.engines import EngineConfig

    add_options(ap.add_argument_group("engine"), EngineConfig)
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no outbound calls

    from bonsai_mlx.app.registry import Registry, discover
    from bonsai_mlx.app.ui import build
    from bonsai_mlx.core.errors import friendly

    models = discover(args.model, args.models_dir)
    if args.model and not models:
        print(f"app: {args.model}: not a model directory (no llava config.json)", file=sys.stderr)
        return 2
    with friendly("app"):
        registry = Registry(models, from_args(EngineConfig, args))
        print(registry.choice.line(), file=sys.stderr, flush=True)  # which engine, and why
        if models:
            first = next(iter(models))
            print(f"loading {first} ...")
            registry.get(first)
    demo = build(registry)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, max_file_size="50mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
