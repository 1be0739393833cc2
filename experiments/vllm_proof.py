"""Proof that vLLM runs a Pico directory unchanged and answers like bonsai_mlx (greedy, float32).

vLLM lives in its own virtualenv (scripts/setup_vllm.sh makes one); this script runs in the project's
environment, builds or takes the model, answers with bonsai_mlx, then runs experiments/vllm_run.py with the
vLLM venv's python as a subprocess and compares token ids:
    bash scripts/setup_vllm.sh .venv-vllm
    python -m experiments.vllm_proof --vllm-python .venv-vllm/bin/python            # or VLLM_PYTHON=...
    python -m experiments.vllm_proof --model runs/shapes/model --image runs/shapes/data/images/shapes-0-9999.png

Routes compared: `LLM.chat` (image_url data URI), `LLM.generate` (the template-rendered prompt + the image
as multi_modal_data) and `vllm serve` (the openai client; streaming text checked against non-streaming),
each with `--model-impl auto` (vLLM's own Llava module; it imports torchvision) and `--model-impl
transformers` (vLLM's Transformers backend: vLLM's engine, scheduler, paged KV cache and sampler around
transformers' Llava modules). A route vLLM cannot start is listed with its error. Images: one square,
one 2:1, one 1:2 (vLLM and bonsai_mlx both resize through the checkpoint's own image processor).
Exit status 0 when every route that ran gave bonsai_mlx's tokens for every image.
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


def _images(size: int, root: Path, source: Path | None) -> list[Path]:
    """A square, a 2:1 and a 1:2 image: `source` resized to each shape (the processor stretches them back),
    or, with no source, noise with a red block in the top-left quarter drawn at each shape."""
    out = []
    rng = np.random.RandomState(0)
    for i, (w, h) in enumerate([(size, size), (2 * size, size), (size, 2 * size)]):
        if source is not None:
            im = Image.open(source).convert("RGB").resize((w, h), Image.BICUBIC)
        else:
            a = (rng.rand(h, w, 3) * 255).astype(np.uint8)
            a[h // 8 : h // 2, w // 8 : w // 2] = (220, 30, 30)
            im = Image.fromarray(a)
        p = root / f"img{i}-{w}x{h}.png"
        im.save(p)
        out.append(p)
    return out


def _bonsai(model_dir: Path, images: list[Path], prompt: str, n: int) -> tuple[list[list[int]], set[int]]:
    from bonsai_mlx.generate import Sampling, generate, load

    model, proc = load(str(model_dir))
    answers = []
    for img in images:
        toks: list[int] = []
        for c in generate(model, proc, prompt, img, Sampling(max_tokens=n)):
            toks += c.tokens
        answers.append(toks)
    return answers, set(proc.stop_ids)


def _vllm(py: str, model: Path, images: list[Path], prompt: str, n: int, impl: str, routes: str) -> list[dict]:
    cmd = [py, str(HERE / "vllm_run.py"), str(model), *map(str, images), "--prompt", prompt]
    cmd += ["--max-tokens", str(n), "--model-impl", impl, "--routes", routes]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the vLLM venv, not this project
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 and not rows:
        raise SystemExit(f"vLLM run failed ({impl}):\n{r.stderr[-3000:]}")
    return rows


def _last_error_line(log: str) -> str:
    """The line that names the failure in a traceback or log tail (the last 'Error'/'Exception' line)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for keys in (("does not import", "No module named"), ("Error", "Exception", "error")):
        named = [ln for ln in lines if any(k in ln for k in keys)]
        if named:
            return named[-1][:300]
    return (lines or ["?"])[-1][:300]


def _agreement(ours: list[int], theirs: list[int]) -> tuple[bool, int]:
    k = 0
    while k < min(len(ours), len(theirs)) and ours[k] == theirs[k]:
        k += 1
    return ours == theirs, k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="vLLM vs bonsai_mlx on the same Pico, greedy float32.")
    ap.add_argument(
        "--vllm-python",
        default=os.environ.get("VLLM_PYTHON", ".venv-vllm/bin/python"),
        help="python of the vLLM virtualenv (default: $VLLM_PYTHON or .venv-vllm/bin/python)",
    )
    ap.add_argument("--model", help="a Pico directory (default: the embedded default's model, untrained)")
    ap.add_argument("--impls", default="auto,transformers", help="vLLM --model-impl values to run")
    ap.add_argument("--routes", default="chat,serve", help="chat (LLM.chat + LLM.generate), serve")
    ap.add_argument("--image", type=Path, help="draw the square, 2:1 and 1:2 images from this one (default: noise)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="What colour is the shape at the top left?")
    ap.add_argument("--work", help="folder for the files (default: a temp folder)")
    a = ap.parse_args(argv)
    if not Path(a.vllm_python).is_file():
        ap.error(f"--vllm-python {a.vllm_python}: not found (make the venv with scripts/setup_vllm.sh)")

    from transformers import AutoTokenizer

    from bonsai_mlx.convert.__main__ import main as convert
    from bonsai_mlx.core.config import PicoConfig

    work = Path(a.work or tempfile.mkdtemp(prefix="vllm-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.model:
        src = Path(a.model)
    else:
        from bonsai_mlx.embedded import make_default_model

        src = make_default_model(work / "pico", image_size=48, seed=0)
    f32 = work / "pico-f32"  # float32 weights, every engine file written by the current code
    convert(["to-hf", str(src), str(f32), "--dtype", "float32"])
    size = PicoConfig.load(f32).vision.image_size
    images = _images(size, work, a.image)
    ref, stops = _bonsai(f32, images, a.prompt, a.max_tokens)
    tok = AutoTokenizer.from_pretrained(str(f32))
    print(f"model: {src} ({size}px processor; images {', '.join(p.name for p in images)}; {a.max_tokens} tokens)")
    print(f"prompt: {a.prompt!r}")
    for img, toks in zip(images, ref, strict=True):
        print(f"  bonsai_mlx {img.name}: {tok.decode(toks)!r}")
    print("| vLLM route | --model-impl | equal answers | tokens equal before the first difference |")
    print("|---|---|---|---|")
    ran = ok = 0
    notes = []
    for impl in a.impls.split(","):
        rows = _vllm(a.vllm_python, f32, images, a.prompt, a.max_tokens, impl, a.routes)
        by_route: dict[str, list[dict]] = {}
        for r in rows:
            by_route.setdefault(r["route"], []).append(r)
        for route, got in by_route.items():
            if "error" in got[0]:
                print(f"| {route} | {impl} | did not start | - |")
                notes.append(f"{route} / {impl}: {_last_error_line(got[0]['error'])}")
                continue
            theirs = [[t for t in g["tokens"] if t not in stops] for g in got]  # vLLM keeps the stop token
            agree = [_agreement(o, t) for o, t in zip(ref, theirs, strict=True)]
            same = sum(s for s, _ in agree)
            prefix = ", ".join(f"{k}/{len(o)}" for (_, k), o in zip(agree, ref, strict=True))
            extra = ""
            if route == "serve":
                extra = " (streamed text equal)" if all(g["stream_text_equal"] for g in got) else " (STREAM DIFFERS)"
                route = f"serve: `{got[0]['server']}`"
            print(f"| {route} | {impl} | {same}/{len(agree)}{extra} | {prefix} |", flush=True)
            ran += 1
            ok += same == len(agree) and all(g.get("stream_text_equal", True) for g in got)
            if os.environ.get("PROOF_VERBOSE"):
                for g in got:
                    print(f"    {Path(g['image']).name}: vLLM {g['text']!r}")
    for n in notes:
        print(f"  not run: {n}")
    if ran == 0:
        return 2
    return 0 if ok == ran else 1


if __name__ == "__main__":
    sys.exit(main())
