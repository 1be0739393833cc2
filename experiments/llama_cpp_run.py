"""Answer prompts about images with llama.cpp (llama-cpp-python's multimodal chat handler), greedy.

Runs in an environment that has llama-cpp-python (built from source), not necessarily this project:
    python experiments/llama_cpp_run.py LM.gguf MMPROJ.gguf --prompt "Describe the image." --max-tokens 12 A.png B.png
prints one JSON line per image: {"image", "text", "tokens", "seconds", "prompt_tokens", "completion_tokens"}.
"tokens" are the answer's token ids as llama.cpp evaluated them (it runs one token past --max-tokens, so
that the last one asked for has been fed back too).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lm")
    ap.add_argument("mmproj")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    a = ap.parse_args(argv)

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    handler = MTMDChatHandler(clip_model_path=a.mmproj, verbose=False)
    llm = Llama(
        model_path=a.lm, chat_handler=handler, n_ctx=a.n_ctx, n_threads=a.threads, verbose=False, logits_all=False
    )
    for path in a.images:
        uri = "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()
        # The handler puts its media marker where the image part is; Pico's prompt is "<image>\n" + text.
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "\n" + a.prompt}]
        t0 = time.perf_counter()
        r = llm.create_chat_completion(
            messages=[{"role": "user", "content": content}],
            max_tokens=a.max_tokens + 1,
            temperature=0.0,
            top_k=1,
            repeat_penalty=1.0,
        )
        dt = time.perf_counter() - t0
        u = r["usage"]
        tokens = [int(t) for t in llm.input_ids[u["prompt_tokens"] : llm.n_tokens]][: a.max_tokens]
        print(
            json.dumps(
                {
                    "image": path,
                    "text": r["choices"][0]["message"]["content"],
                    "tokens": tokens,
                    "seconds": dt,
                    "prompt_tokens": u["prompt_tokens"],
                    "completion_tokens": u["completion_tokens"],
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
