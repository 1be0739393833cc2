"""Speed and memory of Pico variants, side by side with reference engines on the same weights.

Each engine runs in its own subprocess so peak memory is its own. TTFT covers image preprocessing,
the vision tower and prefill; decode tok/s is measured over a fixed number of forced tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bonsai_mlx.core.errors import UserError

PROMPT = (
    "Describe this picture in detail: which objects do you see, what colours and shapes do they have, "
    "and where are they placed relative to each other?"
)
CACHE = Path(os.environ.get("BONSAI_CACHE", Path.home() / ".cache" / "bonsai_mlx"))


def peak_rss_gb() -> float:
    """This process's own peak RSS. On Linux ru_maxrss survives execve, so a worker started by a big parent
    would report the parent's size; the memory map's high-water mark (VmHWM) starts afresh at exec."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9


def bench_image():
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:224, 0:224]
    a = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    a[60:120, 40:100] = (220, 30, 30)
    return Image.fromarray(a)


def random_pico(out: Path = CACHE / "random-pico") -> Path:
    """Full-size Pico shapes (SigLIP-B/16-224 + Qwen2.5-0.5B), real Qwen2.5 vocabulary, random bf16 weights."""
    if (out / "config.json").is_file():
        return out
    import mlx.core as mx

    from bonsai_mlx import loading
    from bonsai_mlx.core.config import TextConfig, VisionConfig
    from bonsai_mlx.model import Pico
    from bonsai_mlx.qwen_vocab import build_qwen25_tokenizer
    from bonsai_mlx.tiny import init_weights, pico_config, write_image_processor

    print(f"building a random full-size Pico in {out} ...", file=sys.stderr)
    tmp = out.with_name(out.name + ".partial")
    tok = build_qwen25_tokenizer(tmp)
    write_image_processor(tmp, 224)
    config = pico_config(VisionConfig(), TextConfig(), tok.convert_tokens_to_ids("<image>"))
    model = Pico(config)
    init_weights(model, seed=0)
    loading.save(model, tmp, dtype=mx.bfloat16)
    tmp.rename(out)
    return out


def variant_dir(base: Path, variant: str) -> Path:
    """float | 8bit | 4bit (LM quantized) | 4bit-vision (the SigLIP linears too)."""
    if variant == "float":
        return base
    kinds = {"8bit": (8, False), "4bit": (4, False), "4bit-vision": (4, True)}
    if variant not in kinds:
        raise UserError(f"--variants: unknown {variant!r} (choose from float, {', '.join(kinds)})")
    bits, vision = kinds[variant]
    d = base.with_name(f"{base.name}-{variant}")
    if not (d / "config.json").is_file():
        from bonsai_mlx.conversion.hf_mlx import to_mlx

        to_mlx(base, d, dtype="float16", bits=bits, quantize_vision=vision)
    return d


# -- workers (one per subprocess) -------------------------------------------------------------
def work_mlx(model_dir: str, tokens: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from bonsai_mlx import device
    from bonsai_mlx.generate import Sampling, generate, load

    model, proc = load(model_dir)
    img = bench_image()
    list(generate(model, proc, "Hi", img, Sampling(max_tokens=2, ignore_stop=True)))  # warm-up
    stats = [c.stats for c in generate(model, proc, PROMPT, img, Sampling(max_tokens=tokens, ignore_stop=True))][-1]
    lm_bytes = sum(v.nbytes for k, v in tree_flatten(model.language_model.parameters()))
    return {
        "ttft_s": stats.ttft_s,
        "decode_tps": stats.decode_tps,
        "prompt_tokens": stats.prompt_tokens,
        "peak_gb": peak_rss_gb(),
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
        "lm_bytes": lm_bytes,
        "device": device.backend(),
    }


def _graph_nodes(y) -> int:
    """Primitives in the unevaluated graph of `y` (MLX's own DOT export): the kernels one step launches,
    up to the fusions a GPU backend makes (on the CPU backend rms_norm/rope/sdpa are several primitives)."""
    import tempfile

    import mlx.core as mx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.dot"
        mx.export_to_dot(str(path), y)
        return sum(1 for line in path.read_text().splitlines() if "shape=rectangle" in line)


def _compile_post_attention(layer) -> Callable:
    """The layer with its cache-free half (residual, norm, MLP, residual) under mx.compile; the attention
    half updates the KV cache at a Python-int offset, which mx.compile would retrace at every token."""
    import mlx.core as mx

    post = mx.compile(lambda x, r: (x + r) + layer.mlp(layer.post_attention_layernorm(x + r)))
    return lambda x, c: post(x, layer.self_attn(layer.input_layernorm(x), None, c))


def work_profile(model_dir: str, tokens: int) -> dict:
    """Decode-step profile over `tokens` forced tokens after a 64-token prefill: graph nodes per token,
    Python time building the step's graph, time evaluating it, without and with mx.compile."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from bonsai_mlx import device
    from bonsai_mlx.generate import load

    model, _ = load(model_dir)
    layers, norm = model.language_model.model.layers, model.language_model.model.norm
    out = {"device": device.backend()}
    for compiled in (False, True):
        steps = (
            [_compile_post_attention(L) for L in layers]
            if compiled
            else [lambda x, c, L=L: L(x, None, c) for L in layers]
        )
        cache = make_prompt_cache(model.language_model)
        h, _ = model.run_layers(model.embed(mx.array([[1] * 64])), cache)
        y = mx.argmax(model.lm_head(h[:, -1]), -1).reshape(1, 1)
        mx.eval(y)
        build = run = 0.0
        for i in range(tokens):
            t0 = time.perf_counter()
            x = model.embed(y)
            for step, c in zip(steps, cache, strict=True):
                x = step(x, c)
            y = mx.argmax(model.lm_head(norm(x)[:, -1]), -1).reshape(1, 1)
            t1 = time.perf_counter()
            if i == 1:
                out["nodes_compiled" if compiled else "nodes"] = _graph_nodes(y)
            mx.eval(y)
            if i >= 2:  # the first steps warm up (and compile)
                build, run = build + t1 - t0, run + time.perf_counter() - t1
        key = "compiled_" if compiled else ""
        out[key + "build_ms"], out[key + "eval_ms"] = 1e3 * build / (tokens - 2), 1e3 * run / (tokens - 2)
    return out


def reference_device() -> str:
    """Where the transformers reference runs: on the GPU MLX uses when there is one (CUDA, else MPS on a
    Mac), else on the CPU, so the comparison is like with like."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()
    elif dev == "mps":
        torch.mps.synchronize()


def work_transformers(model_dir: str, tokens: int, dtype: str) -> dict:
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from bonsai_mlx.core.config import PicoConfig

    torch.set_num_threads(os.cpu_count() or 1)
    dev = reference_device()
    cfg = PicoConfig.load(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval().to(dev)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ip = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False, add_generation_prompt=True
    ).replace("<image>", "<image>" * cfg.num_image_tokens)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=dev)

    class Clock:
        """A generate() streamer that only notes when each put arrives: the prompt, then every new token (each
        already copied to the CPU, so the device has finished it). TTFT and decode come from one run."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(n):
        clock, t = Clock(), time.perf_counter()
        pv = torch.tensor(ip([bench_image()], return_tensors="np")["pixel_values"]).to(dev, model.dtype)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                pixel_values=pv,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        _sync(dev)
        return clock.times[1] - t, clock.times[-1] - clock.times[1]  # TTFT, time of the n-1 later tokens

    run(2)
    ttft, decode = run(tokens)
    lm_bytes = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    lm_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size() * (not cfg.text.tie_word_embeddings)
    return {
        "ttft_s": ttft,
        "decode_tps": (tokens - 1) / decode if decode > 0 else 0.0,
        "prompt_tokens": ids.shape[1],
        "peak_gb": peak_rss_gb(),
        "lm_bytes": lm_bytes,
        "device": dev,
    }


def work_mlx_vlm(model_dir: str, tokens: int) -> dict:
    """mlx-vlm on the same directory, prompted its own way (`prompt_utils.apply_chat_template`, which finds the
    checkpoint's template). mlx-vlm 0.7's LlavaProcessor hands `padding=True` to the image processor, which
    transformers >= 5 refuses; then the row is timed on inputs from transformers' processor through mlx-vlm's
    own `generate_step`, and says so (`note`)."""
    import mlx.core as mx
    from mlx_vlm import generate as vgen
    from mlx_vlm import load as vload
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = vload(model_dir)
    prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)
    img = bench_image()
    try:
        out = vgen(model, processor, prompt, image=[img], max_tokens=tokens, temperature=0.0)
        return {
            "ttft_s": out.prompt_tokens / out.prompt_tps,
            "decode_tps": out.generation_tps,
            "prompt_tokens": out.prompt_tokens,
            "peak_gb": peak_rss_gb(),
            "lm_bytes": 0,
        }
    except ValueError as e:
        if "padding" not in str(e):
            raise
    from mlx_vlm.generate.ar import generate_step
    from transformers import AutoProcessor

    inputs = AutoProcessor.from_pretrained(model_dir)(images=img, text=prompt, return_tensors="np")
    ids, pv = mx.array(inputs["input_ids"]), mx.array(inputs["pixel_values"])
    t0 = time.perf_counter()
    n, t_first = 0, None
    for _tok, _ in generate_step(ids, model, pv, None, max_tokens=tokens, temperature=0.0):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return {
        "ttft_s": t_first - t0,
        "decode_tps": (n - 1) / max(t_end - t_first, 1e-9),
        "prompt_tokens": int(ids.shape[1]),
        "peak_gb": peak_rss_gb(),
        "lm_bytes": 0,
        "note": "mlx-vlm's processor fails on transformers >= 5 (padding=True): timed on transformers' inputs",
    }


def work_llama_engine(model_dir: str, tokens: int, arg: str) -> dict:
    """The project's llama.cpp engine (bonsai_mlx.engines.llama_cpp): what `generate --engine llama.cpp`, the app
    and the server run, the GGUF pair from the cache beside the model, the same session and stats as work_mlx."""
    from bonsai_mlx.engines.llama_cpp import LlamaOptions, load
    from bonsai_mlx.generate import Sampling, new_session

    kind, _, threads = arg.partition(":")  # "q4_0" or "q4_0:1" (threads)
    model, proc = load(model_dir, LlamaOptions(kind or None, threads=int(threads) if threads else None))
    img = bench_image()
    list(new_session(model, proc).ask("Hi", img, Sampling(max_tokens=2, ignore_stop=True)))  # warm-up
    chunks = new_session(model, proc).ask(PROMPT, img, Sampling(max_tokens=tokens, ignore_stop=True))
    stats = [c.stats for c in chunks][-1]
    return {
        "ttft_s": stats.ttft_s,
        "decode_tps": stats.decode_tps,
        "prompt_tokens": stats.prompt_tokens,
        "peak_gb": peak_rss_gb(),
        "lm_bytes": model.files.lm.stat().st_size,
        "device": f"cpu, {model.threads} threads",
        "torch_loaded": "torch" in sys.modules,  # transformers imports it when installed (~0.25 GB of the RSS)
    }


def work_llama_cpp(lm_gguf: str, tokens: int, mmproj: str) -> dict:
    """llama-cpp-python's own multimodal chat handler on the GGUF pair, as a reference for the engine's overhead
    (no project code: it renders the prompt with its own template code and pads images instead of stretching)."""
    import base64
    import io

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    buf = io.BytesIO()
    bench_image().save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm = Llama(
        model_path=lm_gguf,
        chat_handler=MTMDChatHandler(clip_model_path=mmproj, verbose=False),
        n_ctx=1024,
        n_threads=os.cpu_count() or 1,
        verbose=False,
    )
    never_stop = {str(llm.token_eos()): -1e9}

    def run(n: int) -> tuple[float, dict]:
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "\n" + PROMPT}]
        t = time.perf_counter()
        r = llm.create_chat_completion(
            messages=[{"role": "user", "content": content}],
            max_tokens=n,
            temperature=0.0,
            repeat_penalty=1.0,
            logit_bias=never_stop,
        )
        return time.perf_counter() - t, r["usage"]

    run(2)
    ttft, _ = run(1)
    total, usage = run(tokens)
    return {
        "ttft_s": ttft,
        "decode_tps": (usage["completion_tokens"] - 1) / (total - ttft),
        "prompt_tokens": usage["prompt_tokens"],
        "peak_gb": peak_rss_gb(),
        "lm_bytes": Path(lm_gguf).stat().st_size,
    }


def llama_cpp_rows(
    base: Path, types: list[str], tokens: int, python: str, raw: bool = False, threads: int | None = None
) -> list[tuple[str, dict]]:
    """llama.cpp on each GGUF type, each in its own process: the project's engine (the GGUF pair made on first
    use into the cache beside the model), and with `raw` llama-cpp-python's own chat handler on the same files."""
    from bonsai_mlx.engines import gguf_cache

    rows = []
    for kind in types:
        print(f"llama.cpp {kind} ...", file=sys.stderr)
        arg = f"{kind}:{threads}" if threads else kind
        rows.append((f"llama.cpp {kind}", spawn("llama.cpp", base, tokens, arg, python=python)))
        if raw:
            files = gguf_cache.ensure(base, kind, log=lambda m: print(m, file=sys.stderr))
            args = ["--worker", "llama.cpp-raw", "--model", str(files.lm), "--tokens", str(tokens)]
            rows.append(
                (
                    f"llama-cpp-python handler {kind}",
                    _run([python, "-m", "bonsai_mlx.bench", *args, "--worker-arg", str(files.mmproj)]),
                )
            )
    return rows


def _run(cmd: list[str]) -> dict:
    root = Path(__file__).resolve().parents[1]  # the checkout: a --llama-python elsewhere imports this project
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def spawn(kind: str, model_dir: Path, tokens: int, extra: str = "", python: str | None = None) -> dict:
    cmd = [python or sys.executable, "-m", "bonsai_mlx.bench", "--worker", kind, "--model", str(model_dir)]
    return _run([*cmd, "--tokens", str(tokens), "--worker-arg", extra])


def table(rows: list[tuple[str, dict]], bandwidth_gbs: float) -> str:
    ref = next((r for name, r in rows if name.startswith("transformers fp32")), {})
    head = (
        "| engine / variant | TTFT s | decode tok/s | peak RSS GB | decode % of bandwidth bound "
        "| TTFT vs transformers fp32 | decode vs transformers fp32 |"
    )
    lines = [head, "|" + "---|" * 7]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |||||| ")
            continue
        bound = bandwidth_gbs * 1e9 / r["lm_bytes"] if r.get("lm_bytes") else None
        share = f"{100 * r['decode_tps'] / bound:.0f}% of {bound:.0f}" if bound else "-"
        tt = f"{ref['ttft_s'] / r['ttft_s']:.2f}x faster" if ref.get("ttft_s") else "-"
        dd = f"{r['decode_tps'] / ref['decode_tps']:.2f}x" if ref.get("decode_tps") else "-"
        name = f"{name} ({r['device']})" if r.get("device") else name
        lines.append(
            f"| {name} | {r['ttft_s']:.2f} | {r['decode_tps']:.1f} | {r['peak_gb']:.2f} | {share} | {tt} | {dd} |"
        )
    notes = [f"{name}: {r['note']}" for name, r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def profile_table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| variant (device) | graph nodes/token | Python build ms/token | eval ms/token | ms/token "
        "| compiled: nodes | compiled: build ms | compiled: eval ms | compiled: ms/token |",
        "|" + "---|" * 9,
    ]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} ||||||||")
            continue
        cells = [r["nodes"], f"{r['build_ms']:.2f}", f"{r['eval_ms']:.1f}", f"{r['build_ms'] + r['eval_ms']:.1f}"]
        cells += [r["nodes_compiled"], f"{r['compiled_build_ms']:.2f}", f"{r['compiled_eval_ms']:.1f}"]
        cells += [f"{r['compiled_build_ms'] + r['compiled_eval_ms']:.1f}"]
        lines.append(f"| {name} ({r['device']}) | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bonsai_mlx.bench", description=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Pico directory (benchmarked as is)")
    src.add_argument("--random", choices=["pico"], help="build the full-size Pico with random weights (cached)")
    ap.add_argument(
        "--variants", default="float,8bit,4bit,4bit-vision", help="with --random: any of float, 8bit, 4bit, 4bit-vision"
    )
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        choices=["transformers", "mlx-vlm", "llama.cpp", "llama.cpp-raw"],
        help="also run this engine on the same float weights, in the same run (llama.cpp: the project's engine; "
        "llama.cpp-raw: that and llama-cpp-python's own chat handler on the same GGUF files)",
    )
    ap.add_argument(
        "--llama-types", default="q4_0,q8_0,f16", help="with --compare llama.cpp: GGUF types (made on first use)"
    )
    ap.add_argument(
        "--llama-python",
        default=sys.executable,
        help="with --compare llama.cpp: the python that runs the llama.cpp rows (one with llama-cpp-python and this "
        "project's requirements, e.g. a venv without torch)",
    )
    ap.add_argument(
        "--llama-threads", type=int, help="with --compare llama.cpp: threads (default: one per core, as the engine)"
    )
    ap.add_argument("--tokens", type=int, default=128, help="forced new tokens for decode speed")
    ap.add_argument(
        "--profile-decode",
        action="store_true",
        help="per variant: graph nodes per token, Python build vs evaluation ms/token, with and without mx.compile",
    )
    ap.add_argument("--bandwidth-gbs", type=float, default=32.0, help="memory read bandwidth for the bound column")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-arg", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker == "llama.cpp-raw":
        print(json.dumps(work_llama_cpp(a.model, a.tokens, a.worker_arg)))
        return 0
    if a.worker:
        import bonsai_mlx  # noqa: F401

        fn = {
            "mlx": lambda: work_mlx(a.model, a.tokens),
            "transformers": lambda: work_transformers(a.model, a.tokens, a.worker_arg or "float32"),
            "mlx-vlm": lambda: work_mlx_vlm(a.model, a.tokens),
            "profile": lambda: work_profile(a.model, a.tokens),
            "llama.cpp": lambda: work_llama_engine(a.model, a.tokens, a.worker_arg),
        }[a.worker]
        print(json.dumps(fn()))
        return 0

    from bonsai_mlx.core.errors import friendly

    with friendly("bench"):
        base = random_pico() if a.random else Path(a.model)
        rows = []
        variants = a.variants.split(",") if a.random else ["float"]
        if a.profile_decode:
            print(f"\ndecode step after a 64-token prefill, {a.tokens} forced tokens (2 warm-up)\n")
            print(profile_table([(v, spawn("profile", variant_dir(base, v), a.tokens)) for v in variants]))
            return 0
        for v in variants:
            print(f"bonsai_mlx {v} ...", file=sys.stderr)
            rows.append((f"bonsai_mlx {v}", spawn("mlx", variant_dir(base, v), a.tokens)))
        if "transformers" in a.compare:
            for dt in ("float32", "bfloat16"):
                print(f"transformers {dt} ...", file=sys.stderr)
                rows.append(
                    (f"transformers {'fp32' if dt == 'float32' else 'bf16'}", spawn("transformers", base, a.tokens, dt))
                )
        if "mlx-vlm" in a.compare:
            try:
                import mlx_vlm  # noqa: F401
            except ImportError:
                print("mlx-vlm is not installed: skipping it (pip install mlx-vlm)", file=sys.stderr)
            else:
                for v in variants:
                    rows.append((f"mlx-vlm {v}", spawn("mlx-vlm", variant_dir(base, v), a.tokens)))
        if "llama.cpp" in a.compare or "llama.cpp-raw" in a.compare:
            raw = "llama.cpp-raw" in a.compare
            rows += llama_cpp_rows(
                base, a.llama_types.split(","), a.tokens, a.llama_python, raw=raw, threads=a.llama_threads
            )
        busy = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
        from bonsai_mlx.core.config import PicoConfig

        px = PicoConfig.load(base).vision.image_size if (Path(base) / "config.json").is_file() else "?"
        print(
            f"\n{rows[0][1].get('prompt_tokens', '?')} prompt tokens (one {px}px image + text), "
            f"{a.tokens} forced new tokens, bandwidth bound at {a.bandwidth_gbs:g} GB/s{busy}\n"
        )
        print(table(rows, a.bandwidth_gbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
