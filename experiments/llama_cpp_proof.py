"""Proof that llama.cpp runs a Pico exported by `convert to-gguf` and answers like bonsai_mlx (greedy).

Needs llama-cpp-python built from source in some environment (its sdist compiles llama.cpp):
    python3 -m venv .venv-llama && /work/venv-llama/bin/pip install llama-cpp-python
    python -m experiments.llama_cpp_proof --llama-python .venv-llama/bin/python

For each GGUF type the same images are answered by llama.cpp (llama-cpp-python's multimodal chat handler,
the mtmd/clip code) and by bonsai_mlx on the same checkpoint; the table gives how many answers are equal
and, where they differ, the first differing token. llama.cpp pads non-square images to a square where
Pico's processor stretches them, so 2:1 and 1:2 images are handed to llama.cpp already stretched to
image_size x image_size (the script checks that this gives bonsai_mlx the same pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def _images(size: int, root: Path) -> list[tuple[Path, Path]]:
    """(what bonsai_mlx reads, what llama.cpp reads): 3 square images, a 2:1 and a 1:2 one (pre-stretched)."""

    out = []
    rng = np.random.RandomState(0)
    shapes = [(size, size)] * 3 + [(2 * size, size), (size, 2 * size)]
    for i, (w, h) in enumerate(shapes):
        a = (rng.rand(h, w, 3) * 255).astype(np.uint8)
        a[h // 4 : h // 2, w // 4 : w // 2] = (220, 30, 30)
        orig = root / f"img{i}.png"
        Image.fromarray(a).save(orig)
        square = orig
        if w != h:
            square = root / f"img{i}-square.png"
            Image.fromarray(a).resize((size, size), Image.BICUBIC).save(square)
        out.append((orig, square))
    return out


def _bonsai(model_dir: Path, images: list[tuple[Path, Path]], prompt: str, n: int) -> list[list[int]]:
    from bonsai_mlx.generate import Sampling, generate, load

    model, proc = load(str(model_dir))
    answers = []
    for orig, square in images:
        if orig != square:  # the stretched copy gives the same pixels as Pico's own resize of the original
            diff = np.abs(proc.pixel_values([orig]) - proc.pixel_values([square])).max()
            assert diff == 0, f"{orig}: pre-stretched pixels differ by {diff}"
        toks: list[int] = []
        for c in generate(model, proc, prompt, orig, Sampling(max_tokens=n)):
            toks += c.tokens
        answers.append(toks)
    return answers


def _llama(py: str, lm: Path, mmproj: Path, images, prompt: str, n: int) -> list[dict]:
    cmd = [py, str(HERE / "llama_cpp_run.py"), str(lm), str(mmproj), *[str(s) for _, s in images]]
    cmd += ["--prompt", prompt, "--max-tokens", str(n)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp run failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _agreement(ours: list[int], theirs: list[int]) -> tuple[bool, int, int]:
    """(same tokens, tokens equal before the first difference, our token count)."""
    k = 0
    while k < min(len(ours), len(theirs)) and ours[k] == theirs[k]:
        k += 1
    return ours == theirs, k, len(ours)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llama.cpp vs bonsai_mlx on the same Pico, greedy.")
    ap.add_argument(
        "--llama-python", default=sys.executable, help="a python with llama-cpp-python (default: this one, .[llama])"
    )
    ap.add_argument("--model", help="a Pico directory (default: the embedded default's model, untrained)")
    ap.add_argument("--types", default="f32,f16,q8_0,q4_0,q4_k_m")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="What shape is in the picture?")
    ap.add_argument("--work", help="folder for the files (default: a temp folder)")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from bonsai_mlx.convert.__main__ import main as convert
    from bonsai_mlx.core.config import PicoConfig

    work = Path(a.work or tempfile.mkdtemp(prefix="llama-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.model:
        src = Path(a.model)
    else:
        from bonsai_mlx.embedded import make_default_model

        src = make_default_model(work / "pico", image_size=48, seed=0)
    f32 = work / "pico-f32"
    convert(["to-hf", str(src), str(f32), "--dtype", "float32"])
    f16 = work / "pico-f16"  # the same weights rounded as the f16 GGUF rounds them
    convert(["to-hf", str(src), str(f16), "--dtype", "float16"])
    size = PicoConfig.load(f32).vision.image_size
    images = _images(size, work)
    tok = AutoTokenizer.from_pretrained(str(f32))
    ref = {"f32": _bonsai(f32, images, a.prompt, a.max_tokens), "f16": _bonsai(f16, images, a.prompt, a.max_tokens)}

    shim = work / "llama-quantize"
    shim.write_text(f'#!/bin/sh\nexec {a.llama_python} {HERE / "llama_quantize.py"} "$@"\n')
    shim.chmod(0o755)
    print(f"model: {src} ({size}x{size} images, {len(images)} prompts, {a.max_tokens} tokens greedy)")
    print("| GGUF type | reference | equal answers | tokens equal before the first difference |")
    print("|---|---|---|---|")
    for kind in a.types.split(","):
        out = work / f"gguf-{kind}"
        args = ["to-gguf", str(f32), str(out), "--type", kind]
        convert(args + (["--quantizer", str(shim)] if kind == "q4_k_m" else []))
        lm = out / f"pico-f32-{kind}.gguf"
        mmproj = out / f"mmproj-pico-f32-{'f32' if kind == 'f32' else 'f16'}.gguf"
        got = _llama(a.llama_python, lm, mmproj, images, a.prompt, a.max_tokens)
        for ref_name in ("f32", "f16"):
            rows = [_agreement(o, g["tokens"]) for o, g in zip(ref[ref_name], got, strict=True)]
            same = sum(r[0] for r in rows)
            prefix = ", ".join(f"{k}/{n}" for _, k, n in rows)
            print(f"| {kind} | bonsai_mlx {ref_name} | {same}/{len(rows)} | {prefix} |", flush=True)
        if os.environ.get("PROOF_VERBOSE"):
            for (orig, _), g, o in zip(images, got, ref["f32"], strict=True):
                print(f"  {orig.name}: llama.cpp {g['text']!r} | bonsai {tok.decode(o)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
