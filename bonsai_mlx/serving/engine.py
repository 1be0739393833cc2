"""The model, behind one worker thread: the only thread that runs MLX (or llama.cpp, with `--engine llama.cpp`).

HTTP threads parse a request and hand it over as a Job; the worker takes jobs one at a time from a bounded
waiting line and writes the answer's pieces into the job's own bounded queue, which the job's HTTP thread
drains into its socket. No lock is ever held across a socket write, so a client that stops reading cannot
block anyone else: when its queue stays full for `write_timeout`, the worker cancels that job and moves on.
A job is also ended by its deadline (`request_timeout`, waiting included) and by its HTTP thread setting
`cancel` when the client goes away, in either mode.

Each request runs in its own ChatSession, so KV caches never mix; a request that continues an earlier
conversation (same images, the earlier turns as a prefix) picks up that conversation's session and prefills
only what is new, instead of encoding the image again.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonsai_mlx.core.errors import BonsaiError
from bonsai_mlx.engines import EngineConfig
from bonsai_mlx.serving.config import Limits
from bonsai_mlx.serving.images import Ingest
from bonsai_mlx.serving.request import ChatRequest, RequestError, Turn


@dataclass
class Job:
    """One request on its way through the engine. The worker `send`s ("start" | "piece" | "end" | "error",
    value) items; the HTTP thread reads them from `out`."""

    req: ChatRequest
    deadline: float  # time.monotonic()
    out: queue.Queue
    cancel: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any, stall_s: float) -> bool:
        """Queue an item for the client; False (and the job cancelled) if it is gone or reads nothing for stall_s."""
        give_up = time.monotonic() + stall_s
        while not self.cancel.is_set():
            try:
                self.out.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                if time.monotonic() > give_up:
                    self.cancel.set()
        return False


def timeout_error(limits: Limits) -> RequestError:
    return RequestError(504, f"the request took longer than {limits.request_timeout:g} s", code="timeout")


class Engine:
    """The model, its processor, the conversations kept for reuse and the worker that answers jobs in turn."""

    def __init__(self, model_dir: str, limits: Limits | None = None, engine: EngineConfig | None = None, log=None):
        from bonsai_mlx.engines import load

        self.model_dir = model_dir
        loaded = load(model_dir, engine or EngineConfig(engine="mlx"), log=log)  # auto only when asked (the CLI)
        self.model, self.processor, self.choice = loaded.model, loaded.processor, loaded.choice
        self.name = Path(model_dir).name or model_dir
        self.limits = limits or Limits()
        self.context = self.model.config.text.max_position_embeddings
        self.ingest = Ingest(self.processor, self.limits)
        self.sessions: OrderedDict[str, Any] = OrderedDict()  # conversation key -> ChatSession (worker only)
        self.created = int(time.time())
        self._line: queue.Queue = queue.Queue()
        self._waiting = 0
        self._count = threading.Lock()
        self._worker = threading.Thread(target=self._serve, name="engine", daemon=True)
        self._worker.start()

    # -- the HTTP threads' side ----------------------------------------------------------------------------------
    def check_line(self) -> None:
        """Refuse (429) when the waiting line is full."""
        if self._waiting >= self.limits.max_waiting:
            raise RequestError(429, f"the server is busy ({self._waiting} requests waiting); retry later", code="busy")

    def submit(self, req: ChatRequest, arrived: float) -> Job:
        """Put a request in line, or refuse it (429) when the line is full."""
        with self._count:
            self.check_line()
            self._waiting += 1
        job = Job(req, arrived + self.limits.request_timeout, queue.Queue(maxsize=self.limits.stream_buffer))
        self._line.put(job)
        return job

    @property
    def waiting(self) -> int:
        return self._waiting

    # -- the worker ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker after the job it is on (the jobs still waiting are never answered)."""
        self._line.put(None)

    def _serve(self) -> None:
        while True:
            job = self._line.get()
            if job is None:
                return
            with self._count:
                self._waiting -= 1
            try:
                self._answer(job)
            except RequestError as e:
                job.send("error", e, self.limits.write_timeout)
            except BonsaiError as e:  # bad input found late (e.g. by the chat session)
                job.send("error", RequestError(400, str(e), "messages"), self.limits.write_timeout)
            except Exception:  # a bug: logged in full; the client gets a 500 and the worker goes on
                traceback.print_exc()
                err = RequestError(500, "internal error while generating (see the server's log)", code="internal")
                job.send("error", err, self.limits.write_timeout)

    def _answer(self, job: Job) -> None:
        if job.cancel.is_set():
            return
        if time.monotonic() > job.deadline:
            raise timeout_error(self.limits)
        stall = self.limits.write_timeout
        max_tokens = self.check(job.req)
        if not job.send("start", None, stall):
            return
        gen = self.run(job.req, max_tokens)
        try:
            for piece, end in gen:
                if job.cancel.is_set():
                    return
                if time.monotonic() > job.deadline:
                    raise timeout_error(self.limits)
                if not job.send("end" if end else "piece", end or piece, stall):
                    return
        finally:
            gen.close()  # a cancelled answer: its session keeps what was made and is not kept for reuse

    def _session(self, req: ChatRequest):
        """The kept session whose conversation is exactly this request's earlier turns, else a fresh one."""
        from bonsai_mlx.generate import new_session

        earlier = req.turns[:-1]
        s = self.sessions.pop(req.key(earlier), None)
        if s is None:
            s = new_session(self.model, self.processor, system=req.system, on_overflow="refuse")
            s.messages = [{"role": t.role, "content": t.content()} for t in earlier]
            s.images = [p.array for t in earlier for p in t.images]
        last = req.turns[-1]
        s.messages.append({"role": "user", "content": last.content()})
        s.images.extend(p.array for p in last.images)
        return s

    def prompt_tokens(self, req: ChatRequest) -> int:
        msgs = [{"role": "system", "content": [{"type": "text", "text": req.system}]}] if req.system else []
        msgs += [{"role": t.role, "content": t.content()} for t in req.turns]
        return len(self.processor.encode_chat(msgs))

    def check(self, req: ChatRequest) -> int:
        """The max_tokens to use; a prompt that leaves no room in the context is refused (400)."""
        n = self.prompt_tokens(req)
        room = self.context - n
        if room <= 0 or (req.max_tokens is not None and req.max_tokens > room):
            asked = f" + {req.max_tokens} completion" if req.max_tokens is not None else ""
            raise RequestError(
                400,
                f"this model's context is {self.context} tokens; the request has {n} prompt tokens{asked}",
                "messages",
                "context_length_exceeded",
            )
        return req.max_tokens if req.max_tokens is not None else min(self.limits.max_tokens, room)

    def run(self, req: ChatRequest, max_tokens: int) -> Iterator[tuple[str | None, tuple | None]]:
        """Yield (text delta, None) pieces, then (None, (finish_reason, usage)). Worker thread only."""
        from bonsai_mlx.generate import Sampling

        s = self._session(req)
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        text, sent, hold = "", 0, max((len(x) for x in req.stop), default=1) - 1
        stop_hit, stats = False, None
        for chunk in s.regenerate(sampling):
            if chunk.stats is not None:
                stats = chunk.stats
            if stop_hit:
                continue
            text += chunk.text
            cut = min((i for i in (text.find(x) for x in req.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, stop_hit = text[:cut], True
                s.stop_requested = True  # the session ends the turn cleanly on its next step
            ready = len(text) if stop_hit or stats is not None else max(sent, len(text) - hold)
            if ready > sent:
                yield text[sent:ready], None
                sent = ready
        if sent < len(text):
            yield text[sent:], None
        s.messages[-1]["content"] = text  # what the client saw: its next request repeats exactly this
        self.sessions[req.key(req.turns + [Turn("assistant", text)])] = s
        while len(self.sessions) > self.limits.sessions:
            self.sessions.popitem(last=False)
        reason = "stop" if stop_hit or stats.finish_reason in ("stop", "stopped") else "length"
        prompt = stats.prompt_tokens + stats.cached_tokens
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": stats.generated_tokens,
            "total_tokens": prompt + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
        }
        yield None, (reason, usage)
