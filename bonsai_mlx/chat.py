"""python -m bonsai_mlx.chat: talk to a Pico in the terminal, streamed, several turns over one image.

Type a message and press Enter. `/image PATH` attaches an image to your next message, `/reset` starts over,
`/quit` (or Ctrl-D) leaves. The conversation is kept within the model's context: the oldest turns without an
image are dropped when it would not fit (and you are told).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from bonsai_mlx.core.cli import add_options, from_args, opt
from bonsai_mlx.engines import EngineConfig


@dataclass
class ChatConfig:
    model: str = opt(help="model directory or hub id (HF Llava layout, float or MLX-quantized)")
    image: str | None = opt(None, "an image for the first message")
    system: str | None = opt(None, "system prompt")
    max_tokens: int = opt(256, "tokens per answer at most")
    temperature: float = opt(0.0, "0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling")
    seed: int | None = opt(None, "sampling seed")


def run(cfg: ChatConfig, lines=None, out=sys.stdout, engine: EngineConfig | None = None) -> None:
    """The loop, reading `lines` (default: stdin) so that it can be driven by a test. `engine`: which engine runs
    the model (bonsai_mlx.engines; default: its flags' defaults, `auto`)."""
    engine = engine or EngineConfig()
    from bonsai_mlx.core.errors import UserError
    from bonsai_mlx.engines import choose, stderr_log
    from bonsai_mlx.engines import load as load_engine
    from bonsai_mlx.generate import Sampling, new_session

    choice = choose(engine.engine)
    if engine.engine == "auto":  # says which it picked and why (an engine asked for by name is not announced)
        stderr_log(choice.line())
    loaded = load_engine(cfg.model, engine, choice=choice, log=stderr_log)
    session = new_session(loaded.model, loaded.processor, system=cfg.system)
    sampling = Sampling(cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    image = cfg.image
    interactive = lines is None and sys.stdin.isatty()
    print(f"chatting with {cfg.model} (/image PATH, /reset, /quit)", file=out)
    source = lines if lines is not None else sys.stdin
    while True:
        if interactive:
            print(">> ", end="", file=out, flush=True)
        line = next(source, None) if lines is not None else source.readline()
        if line is None or line == "":
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            image = None
            print("(new conversation)", file=out)
            continue
        if text.startswith("/image"):
            image = text[len("/image") :].strip() or None
            print(f"(image for the next message: {image})", file=out)
            continue
        try:
            for chunk in session.ask(text, image, sampling):
                print(chunk.text, end="", file=out, flush=True)
                if chunk.stats is not None and chunk.stats.trimmed_messages:
                    print(f"\n(dropped {chunk.stats.trimmed_messages} earlier messages to fit the context)", file=out)
            print(file=out)
            image = None
        except UserError as e:  # an image that cannot be read, a message that cannot fit: say so, keep chatting
            print(f"\n({e})", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(ap, ChatConfig, required=("model",))
    add_options(ap.add_argument_group("engine"), EngineConfig)
    args = ap.parse_args(argv)
    from bonsai_mlx.core.errors import friendly

    with friendly("chat"):
        run(from_args(ChatConfig, args), engine=from_args(EngineConfig, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
