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

from bonsai_mlx.generate import ChatSession, Chunk, Sampling, load, stream_generate
from bonsai_mlx.generate import generate_text as generate

__all__ = ["ChatSession", "Chunk", "Sampling", "generate", "load", "stream_generate"]
