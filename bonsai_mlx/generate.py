"""Streaming generation over images: a library API, a chat session that keeps its KV cache, a CLI."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from bonsai_mlx.core.processing import IMAGE, Message, Processor
from bonsai_mlx.model import Pico


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens actually prefilled this turn (earlier turns come from the cache)
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = ""

    def line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok (+{self.cached_tokens} cached) | TTFT {self.ttft_s:.2f} s | "
            f"prefill {self.prefill_tps:.1f} tok/s | decode {self.decode_tps:.1f} tok/s | "
            f"{self.generated_tokens} tok | peak {self.peak_memory_gb:.2f} GB | {self.finish_reason}"
        )


@dataclass
class Chunk:
    text: str
    tokens: list[int] = field(default_factory=list)  # the tokens whose text this chunk completes
    stats: Stats | None = None  # set on the last chunk only


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_stop: bool = False  # benchmarks force a fixed number of tokens


def _stable_text(text: str) -> str:
    """Hold back a trailing partial UTF-8 sequence so streamed chunks never show U+FFFD."""
    return text[:-1] if text.endswith("\ufffd") else text


@dataclass
class ChatSession:
    """One conversation. Follow-ups prefill only the new turn; images are encoded once."""

    model: Pico
    processor: Processor
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    images: list = field(default_factory=list)
    cache: list | None = None
    cached_ids: list[int] = field(default_factory=list)  # the tokens whose K/V the cache holds
    stop_requested: bool = False
    _text: str = ""  # the conversation text that _ids encodes, with generated answers kept as sampled
    _ids: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.messages, self.images, self.cache, self.cached_ids, self._text, self._ids = [], [], None, [], "", []

    def _encode(self) -> tuple[str, list[int]]:
        """Token ids of the conversation; earlier answers keep their sampled tokens (no re-tokenizing)."""
        text = self.processor.render(self._conversation(), add_generation_prompt=True)
        if self._text and text.startswith(self._text):
            return text, self._ids + self.processor.encode_text(text[len(self._text) :])
        return text, self.processor.encode_text(text)

    def _conversation(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def ask(self, text: str, image=None, sampling: Sampling | None = None) -> Iterator[Chunk]:
        content = f"{IMAGE}\n{text}" if image is not None else text
        if image is not None:
            self.images.append(image)
        self.messages.append({"role": "user", "content": content})
        yield from self._respond(sampling or Sampling())

    def regenerate(self, sampling: Sampling | None = None) -> Iterator[Chunk]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise ValueError("nothing to regenerate: the conversation is empty")
        yield from self._respond(sampling or Sampling())

    def _reuse(self, ids: list[int]) -> int:
        """Length of the cached prefix to keep (never ending inside an image block, never all of ids)."""
        n = 0
        for a, b in zip(self.cached_ids, ids, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        img = self.processor.image_token_id
        while n > 0 and ids[n - 1] == img and n < len(ids) and ids[n] == img:
            n -= 1
        return n

    def _prefill(self, ids: list[int]) -> tuple[mx.array, int]:
        """Run the part of `ids` the cache lacks (encoding only new images). Returns (last states, reused)."""
        model, proc = self.model, self.processor
        if self.cache is None:
            self.cache = make_prompt_cache(model.language_model)
        keep = self._reuse(ids)
        trim_prompt_cache(self.cache, len(self.cached_ids) - keep)
        new = ids[keep:]
        n_new_images = sum(1 for t in new if t == proc.image_token_id) // model.config.num_image_tokens
        feats = None
        if n_new_images:
            pv = proc.pixel_values(self.images[len(self.images) - n_new_images :])
            feats = model.image_features(mx.array(pv))
        h, _ = model.run_layers(model.embed(mx.array([new]), feats), self.cache)
        self.cached_ids = ids
        return h, keep

    def _decode(
        self, y: mx.array, next_token: Callable, sampling: Sampling, out: list[int]
    ) -> Generator[Chunk, None, tuple[str, str, int]]:
        """Sample until a stop token, max_tokens or stop(); the next step computes while a chunk is yielded.

        Fills `out` with the answer's tokens; returns (finish reason, text shown so far, tokens shown)."""
        proc = self.processor
        shown, n_shown = "", 0
        reason = "length"
        while len(out) < sampling.max_tokens:
            tok = int(y.item())
            if tok in proc.stop_ids and not sampling.ignore_stop:
                reason = "stop"
                break
            out.append(tok)
            more = len(out) < sampling.max_tokens
            if more and not self.stop_requested:
                h, _ = self.model.run_layers(self.model.embed(y.reshape(1, 1)), self.cache)
                y_next = next_token(h)
                mx.async_eval(y_next)  # computes while we detokenize and yield
            self.cached_ids = self.cached_ids + [tok]
            text = _stable_text(proc.decode(out))
            if len(text) > len(shown):
                yield Chunk(text[len(shown) :], out[n_shown:])
                shown, n_shown = text, len(out)
            if self.stop_requested:
                reason = "stopped"
                break
            if more:
                y = y_next
        return reason, shown, n_shown

    def _respond(self, sampling: Sampling) -> Iterator[Chunk]:
        self.stop_requested = False
        prompt_text, ids = self._encode()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        next_token = _token_picker(self.model, self.processor, sampling)
        h, keep = self._prefill(ids)
        y = next_token(h)
        mx.eval(y)
        stats = Stats(prompt_tokens=len(ids) - keep, cached_tokens=keep)
        stats.ttft_s = time.perf_counter() - t0
        stats.prefill_tps = stats.prompt_tokens / stats.ttft_s
        out: list[int] = []
        t1 = time.perf_counter()
        reason, shown, n_shown = yield from self._decode(y, next_token, sampling, out)
        # the last sampled token was never fed to the cache
        if len(self.cached_ids) > self.cache[0].offset:
            self.cached_ids = self.cached_ids[: self.cache[0].offset]
        final = self.processor.decode(out)
        dt = time.perf_counter() - t1
        stats.generated_tokens = len(out)
        stats.decode_tps = (len(out) - 1) / dt if len(out) > 1 and dt > 0 else 0.0
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        stats.finish_reason = reason
        self.messages.append({"role": "assistant", "content": final})
        self._text, self._ids = prompt_text + final, ids + out
        yield Chunk(final[len(shown) :], out[n_shown:], stats)


def _token_picker(model: Pico, proc: Processor, sampling: Sampling) -> Callable[[mx.array], mx.array]:
    """Last hidden states -> the next token, by the sampling settings; <image> is input-only, never sampled."""
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p)
    never = _never(model, proc)

    def next_token(h: mx.array) -> mx.array:
        logits = model.lm_head(h[:, -1, :]).astype(mx.float32) + never
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return next_token


def generate(
    model: Pico,
    processor: Processor,
    prompt: str,
    image=None,
    sampling: Sampling | None = None,
    system: str | None = None,
) -> Iterator[Chunk]:
    """Stream one answer; the last chunk carries the stats."""
    yield from ChatSession(model, processor, system=system).ask(prompt, image, sampling)


def _never(model: Pico, proc: Processor) -> mx.array:
    """-inf on <image>: it is input-only, never sampled."""
    return mx.zeros((model.config.text.vocab_size,)).at[proc.image_token_id].add(-mx.inf)


def generate_batch(
    model: Pico, processor: Processor, prompts: list[tuple[str, object]], max_tokens: int = 32
) -> list[str]:
    """Greedy answers to several single-turn (prompt, image-or-None) pairs at once: the same answers as
    `generate` one by one, in one left-padded batch (mlx-lm's BatchKVCache masks the padding)."""
    from mlx_lm.models.cache import BatchKVCache

    proc = processor
    ids = [proc.encode([{"role": "user", "content": f"{IMAGE}\n{q}" if im is not None else q}]) for q, im in prompts]
    width = max(len(x) for x in ids)
    pad = [width - len(x) for x in ids]
    pad_id = proc.tokenizer.pad_token_id if proc.tokenizer.pad_token_id is not None else 0
    tokens = mx.array([[pad_id] * p + x for p, x in zip(pad, ids, strict=True)])
    images = [im for _, im in prompts if im is not None]
    feats = model.image_features(mx.array(proc.pixel_values(images))) if images else None
    cache = [BatchKVCache(pad) for _ in model.language_model.layers]
    never = _never(model, proc)

    def next_tokens(h: mx.array) -> mx.array:
        return mx.argmax(model.lm_head(h[:, -1, :]).astype(mx.float32) + never, axis=-1)

    h, _ = model.run_layers(model.embed(tokens, feats), cache)
    y = next_tokens(h)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_tokens):
        for i, t in enumerate(y.tolist()):
            if not done[i]:
                done[i] = t in proc.stop_ids
                if not done[i]:
                    out[i].append(t)
        if all(done) or step == max_tokens - 1:
            break
        h, _ = model.run_layers(model.embed(y[:, None]), cache)
        y = next_tokens(h)
    return [proc.decode(o) for o in out]


def load(model_dir: str):
    """(model, processor) ready to generate."""
    from bonsai_mlx import loading

    model, config = loading.load(model_dir)
    return model, Processor(loading.resolve(model_dir), config)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.generate", description="Answer one prompt about an image, streamed."
    )
    ap.add_argument(
        "--model", required=True, help="model directory or hub id (HF Llava layout, float or MLX-quantized)"
    )
    ap.add_argument("--image", help="image file (omit for a text-only prompt)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--system", help="system prompt")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    from bonsai_mlx.core.errors import friendly

    with friendly():
        model, proc = load(args.model)
        sampling = Sampling(args.max_tokens, args.temperature, args.top_p, args.seed)
        for chunk in generate(model, proc, args.prompt, args.image, sampling, args.system):
            print(chunk.text, end="", flush=True)
            if chunk.stats:
                print()
                print(chunk.stats.line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
