"""Chat handlers, free of Gradio so they can be tested directly.

A Conversation is one tab's state: its ChatSession (KV cache, image features) and what it shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.images import ImageError, load_image
from bonsai_mlx.generate import ChatSession, Sampling

MAX_PROMPT_TOKENS = 2048


@dataclass
class Settings:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    system: str = ""

    def sampling(self) -> Sampling:
        return Sampling(max_tokens=int(self.max_tokens), temperature=float(self.temperature), top_p=float(self.top_p))


@dataclass
class Conversation:
    model_name: str | None = None
    session: ChatSession | None = None
    history: list[dict] = field(default_factory=list)  # what the chatbot shows
    stats: list[str] = field(default_factory=list)  # one line per answer

    def clear(self) -> None:
        """Start over; a running answer is asked to stop (it ends by itself and releases the model)."""
        if self.session is not None:
            self.session.stop_requested = True
        self.session, self.history, self.stats = None, [], []


def _note(conv: Conversation, text: str) -> list[dict]:
    """A friendly message in the chat instead of an error page."""
    conv.history.append({"role": "assistant", "content": f"⚠️ {text}"})
    return conv.history


def _ensure_session(conv: Conversation, registry, model_name: str, settings: Settings) -> ChatSession:
    """The tab's session on `model_name` (the caller holds registry.lock). A session detached by a model switch in
    another tab keeps its conversation and gets its model back here."""
    if conv.session is None or conv.model_name != model_name:
        conv.session = registry.session_class()(None, None)  # ChatSession on the registry's engine
        conv.model_name = model_name
    if conv.session.model is None or registry.name != model_name:
        registry.attach(conv.session, model_name)
    conv.session.system = settings.system or None
    return conv.session


def _stream(conv: Conversation, chunks) -> Iterator[list[dict]]:
    """Stream an answer into the chat. A conversation that cannot fit the model's context (the session has
    already dropped what it may: its oldest exchanges without an image) ends in a note, and the session is as
    it was before the turn."""
    answer = {"role": "assistant", "content": ""}  # (held here: Clear may replace conv.history meanwhile)
    conv.history.append(answer)
    try:
        for chunk in chunks:
            answer["content"] += chunk.text
            if chunk.stats:
                s = chunk.stats
                tps = f"{s.decode_tps:.1f} tok/s" if s.generated_tokens > 1 else "- tok/s"
                line = f"TTFT {s.ttft_s:.2f} s · {tps} · {s.generated_tokens} tokens · peak {s.peak_memory_gb:.2f} GB"
                if s.trimmed_messages:
                    line += f" · {s.trimmed_messages} earlier messages left out to fit the context"
                conv.stats.append(line)
                # shown under the answer itself (the session keeps the plain answer text)
                answer["content"] += f"\n\n<sub>{conv.stats[-1]}</sub>"
            yield conv.history
    except UserError as e:
        conv.history[:] = [m for m in conv.history if m is not answer or m["content"]]
        yield _note(conv, f"{str(e)[:1].upper()}{str(e)[1:]}.")


def submit(
    conv: Conversation, registry, model_name: str, text: str, image: str | None, settings: Settings
) -> Iterator[list[dict]]:
    """A user turn: validate, then stream the answer (follow-ups reuse the session's cache)."""
    text = (text or "").strip()
    if image:
        try:
            load_image(image)
        except ImageError as e:
            yield _note(conv, f"That file can't be used as an image: {e}")
            return
    if not text:
        yield _note(conv, "Please type a question" + (" about the image." if image else "."))
        return
    with registry.lock:  # all MLX work, one tab at a time (a model switch waits for this answer)
        session = _ensure_session(conv, registry, model_name, settings)
        n = len(session.processor.encode_literal(text))
        if n > MAX_PROMPT_TOKENS:
            yield _note(conv, f"That message is {n} tokens; the limit is {MAX_PROMPT_TOKENS}. Please shorten it.")
            return
        chunks = session.ask(text, image, settings.sampling())  # (a Stop pressed from now on counts)
        if image:
            conv.history.append({"role": "user", "content": {"path": image}})
        conv.history.append({"role": "user", "content": text})
        yield conv.history
        yield from _stream(conv, chunks)


def regenerate(conv: Conversation, registry, settings: Settings) -> Iterator[list[dict]]:
    if conv.session is None or not conv.session.messages or conv.session.messages[-1]["role"] != "assistant":
        yield _note(conv, "There is no answer to regenerate yet.")
        return
    with registry.lock:
        session = _ensure_session(conv, registry, conv.model_name, settings)
        chunks = session.regenerate(settings.sampling())
        while conv.history and conv.history[-1]["role"] == "assistant":
            conv.history.pop()
        if conv.stats:
            conv.stats.pop()
        yield from _stream(conv, chunks)


def stop(conv: Conversation) -> None:
    """Ask the running answer to end; it ends on its own, and the session keeps the part already shown."""
    if conv.session is not None:
        conv.session.stop_requested = True
