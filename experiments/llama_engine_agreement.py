"""How often the llama.cpp engine's greedy answer equals MLX's, per GGUF type (docs/engines.md's table).

    python -m experiments.llama_engine_agreement runs/shapes/model --types f32,f16,q8_0,q4_0 --n 10

Held-out questions of the embedded task, each image square, stretched to 2:1 and to 1:2; MLX float32 and
llama.cpp (`bonsai_mlx.engines.llama_cpp`, the GGUF pair from the cache beside the model) on the same directory.
"""

from __future__ import annotations

import argparse
import sys

from PIL import Image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--types", default="f32,f16,q8_0,q4_0")
    ap.add_argument("--n", type=int, default=10, help="held-out questions (x 3 image shapes)")
    ap.add_argument("--max-tokens", type=int, default=8)
    a = ap.parse_args(argv)

    from bonsai_mlx.core.synthetic import sample
    from bonsai_mlx.engines.llama_cpp import LlamaOptions
    from bonsai_mlx.engines.llama_cpp import load as load_llama
    from bonsai_mlx.generate import ChatSession, Sampling, load, new_session

    model, proc = load(a.model)
    prompts = []
    for i in range(a.n):
        s = sample(10_000_000 + i, 0, 48)
        w, h = s["image"].size
        for shape, size in (("square", None), ("2:1", (2 * w, h)), ("1:2", (w, 2 * h))):
            im = s["image"] if size is None else s["image"].resize(size, Image.BICUBIC)
            prompts.append((shape, s["turns"][0][0], im))

    def answer(session, q, im) -> list[int]:
        return [t for c in session.ask(q, im, Sampling(max_tokens=a.max_tokens)) for t in c.tokens]

    ref = [answer(ChatSession(model, proc), q, im) for _, q, im in prompts]
    print("| GGUF type | equal answers |\n|---|---|")
    for kind in a.types.split(","):
        lm, lp = load_llama(a.model, LlamaOptions(kind))
        got = [answer(new_session(lm, lp), q, im) for _, q, im in prompts]
        same = sum(x == y for x, y in zip(ref, got, strict=True))
        print(f"| {kind} | {same}/{len(prompts)} |", flush=True)
        lm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
