"""Streaming generation over images: a library API, a chat session that keeps its KV cache, a CLI."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    StreamingDetokenizer,
    _byte_decoder,
)

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.processing import _MARK, Message, Processor
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
    trimmed_messages: int = 0  # earlier messages dropped this turn to fit the model's context

    def line(self) -> str:
        trimmed = f" | {self.trimmed_messages} earlier messages dropped to fit the context"
        return (
            f"prompt {self.prompt_tokens} tok (+{self.cached_tokens} cached) | TTFT {self.ttft_s:.2f} s | "
            f"prefill {self.prefill_tps:.1f} tok/s | decode {self.decode_tps:.1f} tok/s | "
            f"{self.generated_tokens} tok | peak {self.peak_memory_gb:.2f} GB | {self.finish_reason}"
            + (trimmed if self.trimmed_messages else "")
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


class _ByteLevelDetokenizer(BPEStreamingDetokenizer):
    """mlx-lm's O(1)-per-token byte-level BPE detokenizer, made to give exactly `tokenizer.decode`'s text: a
    leading space is kept, and the NUL byte (which mlx-lm's lookup takes for "not a byte") is decoded."""

    def _maybe_trim_space(self, current_text: str) -> str:
        return current_text

    def _decode_bytes(self, seq: str) -> str:
        table = _byte_decoder()
        out = bytearray()
        for c in seq:
            b = table.get(c)
            if b is None:
                out.extend(c.encode("utf-8"))
            else:
                out.append(b)
        return out.decode("utf-8", "replace")

    def finalize(self) -> None:
        self.text += self._decode_bytes(self._unflushed)
        self._unflushed = ""


_DETOK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def detokenizer(proc: Processor) -> StreamingDetokenizer:
    """A fresh streaming detokenizer for `proc` (the token map is built once per processor)."""
    proto = _DETOK.get(proc)
    if proto is None:
        tj = proc.dir / "tokenizer.json"
        decoder = json.loads(tj.read_text()).get("decoder") if tj.is_file() else None
        if isinstance(decoder, dict) and decoder.get("type") == "ByteLevel":
            proto = _ByteLevelDetokenizer(proc.tokenizer)
        else:
            proto = NaiveStreamingDetokenizer(proc.tokenizer)  # O(line^2), as in mlx-lm
        _DETOK[proc] = proto
    d = copy.copy(proto)
    d.reset()
    return d


def user_message(text: str, image: bool = False) -> Message:
    """A chat user turn: an image part (when there is an image) and the text, which stays literal."""
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def _has_image(m: Message) -> bool:
    return isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])


def _oldest_droppable(messages: list[Message]) -> tuple[int, int] | None:
    """The oldest exchange (a user turn and the answers after it) that may go to make room: never one that
    carries an image (the session's images stay aligned with its image slots), never the newest user turn."""
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    for a, b in zip(starts, starts[1:], strict=False):
        if not _has_image(messages[a]):
            return a, b
    return None


def _literal(m: Message) -> Message:
    """Chat text is never parsed for tags: string contents become one text part."""
    return m if isinstance(m["content"], list) else {**m, "content": [{"type": "text", "text": m["content"]}]}


@dataclass
class ChatSession:
    """One conversation. Follow-ups prefill only the new turn; images are encoded once.

    Text typed by the user is literal: `<image>` or `<|im_end|>` in it never become image slots or control tokens
    (only an image passed to `ask` makes an image slot). A turn that fails before its answer starts leaves the
    session as it was; an answer cut short (stop, a closed stream) is kept as far as it got.

    The conversation must fit the model's context (max_position_embeddings; positions past it were never trained).
    `on_overflow="trim"` drops the oldest exchanges without an image until the prompt plus `max_tokens` fits, then
    shortens `max_tokens` to the room left; `"refuse"` raises a UserError instead. A prompt that cannot fit at all
    is refused in either mode, and the session stays as it was."""

    model: Pico | None
    processor: Processor | None
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    images: list = field(default_factory=list)
    cache: list | None = None
    cached_ids: list[int] = field(default_factory=list)  # the tokens whose K/V the cache holds
    stop_requested: bool = False
    on_overflow: str = "trim"  # or "refuse": see the class docstring
    _text: str = ""  # the marked rendering (Processor.render_marked) that _ids encodes, up to the last answer
    _msgs: list = field(default_factory=list)  # the conversation that _text renders
    _ids: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.messages, self.images = [], []
        self._forget_cache()

    def _forget_cache(self) -> None:
        self.cache, self.cached_ids, self._text, self._msgs, self._ids = None, [], "", [], []

    def detach(self) -> None:
        """Drop the model, processor and KV cache (the conversation stays): the app frees a model this way."""
        self.model = self.processor = None
        self._forget_cache()

    def _conversation(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [_literal(m) for m in system + self.messages]

    def _encode(self) -> tuple[str, list[int], list[Message]]:
        """Token ids of the conversation; earlier answers keep their sampled tokens (no re-tokenizing)."""
        conv = self._conversation()
        marked = self.processor.render_marked(conv, add_generation_prompt=True)
        if self._text and conv[: len(self._msgs)] == self._msgs and marked.startswith(self._text):
            return marked, self._ids + self.processor.encode_marked(marked[len(self._text) :], conv), conv
        return marked, self.processor.encode_marked(marked, conv), conv

    def ask(self, text: str, image=None, sampling: Sampling | None = None) -> Iterator[Chunk]:
        self.stop_requested = False  # now, not when the stream starts: a Stop pressed while queued still counts
        msg = user_message(text, image is not None)
        return self._turn([msg], [image] if image is not None else [], sampling)

    def regenerate(self, sampling: Sampling | None = None) -> Iterator[Chunk]:
        self.stop_requested = False
        return self._turn([], [], sampling, redo=True)

    def _turn(self, msgs: list[Message], images: list, sampling: Sampling | None, redo: bool = False):
        before = (list(self.messages), list(self.images))
        if redo:
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if not self.messages:
                raise UserError("nothing to regenerate: the conversation is empty")
        self.messages += msgs
        self.images += images
        yield from self._respond(sampling or Sampling(), before)

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

    def _trim_to(self, n: int) -> None:
        """Every layer's cache and cached_ids to the same n tokens (a failed step may advance only some layers)."""
        n = min([n, len(self.cached_ids)] + [c.offset for c in self.cache])
        for c in self.cache:
            if c.offset > n:
                c.trim(c.offset - n)
        self.cached_ids = self.cached_ids[:n]

    def _prefill(self, ids: list[int]) -> tuple[mx.array, int]:
        """Run the part of `ids` the cache lacks (encoding only new images). Returns (last states, reused)."""
        model, proc = self.model, self.processor
        if self.cache is None:
            self.cache = make_prompt_cache(model.language_model)
        keep = self._reuse(ids)
        self._trim_to(keep)
        new = ids[keep:]
        n_new_images = sum(1 for t in new if t == proc.image_token_id) // model.config.num_image_tokens
        try:
            feats = None
            if n_new_images:
                pv = proc.pixel_values(self.images[len(self.images) - n_new_images :])
                feats = model.image_features(mx.array(pv))
            h, _ = model.run_layers(model.embed(mx.array([new]), feats), self.cache)
            mx.eval(h)
        except BaseException:
            self._trim_to(keep)
            raise
        self.cached_ids = list(ids)
        return h, keep

    # The engine's hooks: _picker, _prefill, _first (the first token, computed), _step (feed one token, the next
    # token on its way), _token (that token as an int), _reset_peak, _peak_gb. The rest is engine-free turn logic.
    def _picker(self, sampling: Sampling) -> Callable:
        return _token_picker(self.model, self.processor, sampling)

    @staticmethod
    def _first(pick: Callable, h):
        y = pick(h)
        mx.eval(y)
        return y

    # MLX computes the next step asynchronously while a chunk is yielded; a synchronous engine steps after it
    _step_ahead = True

    def _advance(self, tok: int, pick: Callable):
        """Feed `tok` to the cache: the next step's output (see _token)."""
        y = self._step(tok, pick)
        self.cached_ids.append(tok)
        return y

    def _step(self, tok: int, pick: Callable):
        h, _ = self.model.run_layers(self.model.embed(mx.array([[tok]])), self.cache)
        y = pick(h)
        mx.async_eval(y)  # computes while the caller detokenizes and yields
        return y

    @staticmethod
    def _token(y) -> int:
        return int(y.item())

    @staticmethod
    def _reset_peak() -> None:
        mx.reset_peak_memory()

    @staticmethod
    def _peak_gb() -> float:
        return mx.get_peak_memory() / 1e9

    def _decode(
        self, y, pick: Callable, sampling: Sampling, out: list[int], detok: StreamingDetokenizer
    ) -> Generator[Chunk, None, tuple[str, int]]:
        """Sample until a stop token, max_tokens or stop(); with `_step_ahead` the next step is on its way while a
        chunk is yielded.

        Fills `out` with the answer's tokens and `detok` with their text; returns (finish reason, tokens shown)."""
        proc = self.processor
        special = set(proc.tokenizer.all_special_ids)
        n_shown = 0
        while len(out) < sampling.max_tokens:
            tok = self._token(y)
            if tok in proc.stop_ids and not sampling.ignore_stop:
                return "stop", n_shown
            out.append(tok)
            more = len(out) < sampling.max_tokens
            y_next = None
            if more and self._step_ahead and not self.stop_requested:
                y_next = self._advance(tok, pick)
            if tok not in special:  # as decode(skip_special_tokens=True)
                detok.add_token(tok)
            seg = detok.last_segment
            if seg:
                yield Chunk(seg, out[n_shown:])
                n_shown = len(out)
            if self.stop_requested:
                return "stopped", n_shown
            if more:
                y = y_next if y_next is not None else self._advance(tok, pick)
        return "length", n_shown

    def _record(self, prompt_text: str, conv: list[Message], ids: list[int], out: list[int], detok) -> None:
        """Keep the answer (whole or partial) so the model sees what the user saw; cache and ids agree."""
        self._trim_to(len(ids) + len(out))  # the last sampled token was never fed to the cache
        detok.finalize()
        final = detok.text
        self.messages.append({"role": "assistant", "content": final})
        self._text = prompt_text + _MARK.format(len(conv))
        self._msgs = [*conv, _literal(self.messages[-1])]
        self._ids = ids + out

    def _fit(self, sampling: Sampling) -> tuple[str, list[int], list[Message], Sampling, int]:
        """Encode the conversation so that it fits the context (see the class docstring): (marked text, ids,
        conversation, sampling with max_tokens within the room left, messages dropped)."""
        context = self.model.config.text.max_position_embeddings
        dropped = 0
        while True:
            prompt_text, ids, conv = self._encode()
            if len(ids) + sampling.max_tokens <= context or self.on_overflow != "trim":
                break
            span = _oldest_droppable(self.messages)
            if span is None:
                break
            del self.messages[span[0] : span[1]]
            dropped += span[1] - span[0]
        room = context - len(ids)
        if room <= 0 or (self.on_overflow != "trim" and sampling.max_tokens > room):
            raise UserError(
                f"the conversation is {len(ids)} tokens and the answer may take {sampling.max_tokens} more, but this "
                f"model's context is {context} tokens (max_position_embeddings): start a new chat or send less text"
            )
        if sampling.max_tokens > room:
            sampling = dataclasses.replace(sampling, max_tokens=room)
        return prompt_text, ids, conv, sampling, dropped

    def _respond(self, sampling: Sampling, before: tuple[list, list]) -> Iterator[Chunk]:
        try:
            prompt_text, ids, conv, sampling, dropped = self._fit(sampling)
            self._reset_peak()
            t0 = time.perf_counter()
            pick = self._picker(sampling)
            h, keep = self._prefill(ids)
            y = self._first(pick, h)
        except BaseException:
            self.messages[:], self.images[:] = before  # a failed turn leaves the session as it was
            raise
        stats = Stats(prompt_tokens=len(ids) - keep, cached_tokens=keep, trimmed_messages=dropped)
        stats.ttft_s = time.perf_counter() - t0
        stats.prefill_tps = stats.prompt_tokens / stats.ttft_s
        out: list[int] = []
        detok = detokenizer(self.processor)
        t1 = time.perf_counter()
        try:
            reason, n_shown = yield from self._decode(y, pick, sampling, out, detok)
        except BaseException:  # the stream was closed (a cancelled request) or failed: keep what was produced
            self._record(prompt_text, conv, ids, out, detok)
            raise
        self._record(prompt_text, conv, ids, out, detok)
        dt = time.perf_counter() - t1
        stats.generated_tokens = len(out)
        stats.decode_tps = (len(out) - 1) / dt if len(out) > 1 and dt > 0 else 0.0
        stats.peak_memory_gb = self._peak_gb()
        stats.finish_reason = reason
        yield Chunk(detok.last_segment, out[n_shown:], stats)


class LlamaChatSession(ChatSession):
    """A ChatSession whose turns run in llama.cpp (bonsai_mlx.engines.llama_cpp.LlamaModel): the same conversation
    rules, prompts, stop and stats. One llama.cpp context serves every session of a model: a session `claim`s it
    for its turn, and the model copies the previous owner's KV cache out (into that session's `cache`, as bytes)
    and puts it back when that session speaks again."""

    def _claimed(self):
        m = self.model
        m.claim(self)
        return m

    def _trim_to(self, n: int) -> None:
        m = self.model
        n = min(n, len(self.cached_ids))
        if m is not None and m.owns(self):
            m.trim(n)
            self.cached_ids = self.cached_ids[:n]
        elif n < len(self.cached_ids):  # a copied-out cache cannot be cut: prefill again next time
            self.cache, self.cached_ids = None, []

    def _prefill(self, ids: list[int]):
        from bonsai_mlx.engines.llama_cpp import pico_pixels

        m, proc = self._claimed(), self.processor
        keep = self._reuse(ids)
        self._trim_to(keep)
        keep = len(self.cached_ids)
        new = ids[keep:]
        n_img = self.model.config.num_image_tokens
        n_new_images = sum(1 for t in new if t == proc.image_token_id) // n_img
        try:
            images = self.images[len(self.images) - n_new_images :] if n_new_images else []
            pixels = [pico_pixels(proc, im) for im in images]
            logits = m.prefill(new, keep, pixels, proc.image_token_id, n_img)
        except BaseException:
            self._trim_to(keep)
            raise
        self.cached_ids = list(ids)
        return logits, keep

    def _picker(self, sampling: Sampling) -> Callable:
        from bonsai_mlx.engines.llama_cpp import make_picker

        return make_picker(self.model, self.processor, sampling)

    @staticmethod
    def _first(pick: Callable, logits) -> int:
        return pick(logits)

    _step_ahead = False  # llama.cpp decodes synchronously: show the chunk first, then step

    def _step(self, tok: int, pick: Callable) -> int:
        return pick(self.model.step(tok, len(self.cached_ids)))

    @staticmethod
    def _token(tok: int) -> int:
        return tok

    @staticmethod
    def _reset_peak() -> None:
        """Nothing to reset: the process's peak resident memory (VmHWM) only grows."""

    @staticmethod
    def _peak_gb() -> float:
        """The process's peak resident memory (MLX reports its allocator's; llama.cpp has none to report)."""
        from bonsai_mlx.engines.llama_cpp import peak_rss_gb

        return peak_rss_gb()


def session_class(model) -> type[ChatSession]:
    """The session class that runs on `model`'s engine: ChatSession for a Pico, LlamaChatSession for a llama.cpp
    model (bonsai_mlx.engines.llama_cpp.LlamaModel)."""
    return LlamaChatSession if getattr(model, "engine", "mlx") == "llama.cpp" else ChatSession


def new_session(model, processor, **kw) -> ChatSession:
    """A chat session on `model`'s engine (ChatSession's keywords)."""
    return session_class(model)(model, processor, **kw)


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
    """Stream one answer; the last chunk carries the stats. `model` may be a Pico or a llama.cpp model
    (bonsai_mlx.engines): the session runs on its engine."""
    yield from new_session(model, processor, system=system).ask(prompt, image, sampling)


def stream_generate(
    model: Pico,
    processor: Processor,
    prompt: str,
    image=None,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    system: str | None = None,
) -> Iterator[Chunk]:
    """The public streaming call (`from bonsai_mlx import stream_generate`): `Chunk`s of text, the last one with
    `stats`. `image`: a path, a PIL image or None; temperature 0 is greedy."""
    yield from generate(model, processor, prompt, image, Sampling(max_tokens, temperature, top_p, seed), system)


def generate_text(model: Pico, processor: Processor, prompt: str, image=None, **kw) -> str:
    """The whole answer as one string (`from bonsai_mlx import generate`; keywords as `stream_generate`)."""
    return "".join(c.text for c in stream_generate(model, processor, prompt, image, **kw))


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
    ids = [proc.encode_chat([user_message(q, im is not None)]) for q, im in prompts]
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


def load(model_dir: str, engine: str = "mlx", **llama):
    """(model, processor) ready to generate. `engine`: "mlx" (a Pico in MLX), "llama.cpp" (the GGUF pair, made on
    first use beside the model; `gguf_type`, `n_ctx`, `threads` as keywords) or "auto" (bonsai_mlx.engines)."""
    if engine != "mlx":
        from bonsai_mlx.engines import EngineConfig
        from bonsai_mlx.engines import load as load_engine

        loaded = load_engine(model_dir, EngineConfig(engine=engine, **llama))
        return loaded.model, loaded.processor
    from bonsai_mlx import loading  # (bonsai_mlx.engines loads an MLX Pico the same way, without this module)

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
    from bonsai_mlx.core.cli import add_options, from_args
    from bonsai_mlx.engines import EngineConfig, choose, stderr_log
    from bonsai_mlx.engines import load as load_engine

    add_options(ap.add_argument_group("engine"), EngineConfig)
    args = ap.parse_args(argv)
    from bonsai_mlx.core.errors import friendly

    with friendly():
        cfg = from_args(EngineConfig, args)
        choice = choose(cfg.engine)
        if cfg.engine == "auto":  # says which it picked and why (an engine asked for by name is not announced)
            stderr_log(choice.line())
        loaded = load_engine(args.model, cfg, choice=choice, log=stderr_log)
        model, proc = loaded.model, loaded.processor
        sampling = Sampling(args.max_tokens, args.temperature, args.top_p, args.seed)
        for chunk in generate(model, proc, args.prompt, args.image, sampling, args.system):
            print(chunk.text, end="", flush=True)
            if chunk.stats:
                print()
                print(chunk.stats.line(), file=sys.stderr)
    return 0


class _CallableModule(type(sys)):
    """`from bonsai_mlx import generate` is the API function, but once this module is imported the package attribute
    `generate` names the module; calling the module is then the same call (generate_text)."""

    def __call__(self, *args, **kwargs):
        return generate_text(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
