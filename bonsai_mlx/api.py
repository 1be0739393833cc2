"""The Python API, as mlx-lm's: `load` a Pico, then `generate` an answer or `stream_generate` it; `ChatSession`
for a conversation. `from bonsai_mlx import load, generate` reaches these lazily (importing bonsai_mlx alone loads
neither MLX nor torch).

    from bonsai_mlx import load, generate, stream_generate
    model, processor = load("runs/shapes/model")
    print(generate(model, processor, "What colour is the shape?", image="photo.png"))
    for chunk in stream_generate(model, processor, "Describe it.", image="photo.png"):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bonsai_mlx.generate import ChatSession, Chunk, Sampling
from bonsai_mlx.generate import generate as _stream
from bonsai_mlx.generate import load as _load

__all__ = ["ChatSession", "Chunk", "Sampling", "generate", "load", "stream_generate"]


def load(path: str) -> tuple[Any, Any]:
    """(model, processor) of a Pico directory or hub id (float or MLX-quantized)."""
    return _load(path)


def stream_generate(
    model,
    processor,
    prompt: str,
    image: Any = None,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    system: str | None = None,
) -> Iterator[Chunk]:
    """The answer as it is made: `Chunk`s of text; the last one carries `stats` (TTFT, tokens/s, peak memory).
    `image`: a path, a PIL image or None; temperature 0 is greedy."""
    yield from _stream(model, processor, prompt, image, Sampling(max_tokens, temperature, top_p, seed), system)


def generate(model, processor, prompt: str, image: Any = None, **kw: Any) -> str:
    """The whole answer as one string (keywords as `stream_generate`)."""
    return "".join(c.text for c in stream_generate(model, processor, prompt, image, **kw))
