"""An OpenAI-compatible chat server over a Pico: `POST /v1/chat/completions`, `GET /v1/models`.

It runs the same generation code as the CLI and the app (`bonsai_mlx.generate.ChatSession`). Requests are
served one at a time (a queue behind one lock), each in its own session, so KV caches never mix; a request
that continues an earlier conversation (same images, the earlier turns as a prefix) picks up that
conversation's session and prefills only what is new, instead of encoding the image again.

Standard library HTTP only (`http.server`); binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bonsai_mlx.core.images import ImageError, load_image
from bonsai_mlx.core.processing import IMAGE

MiB = 1 << 20


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
        return {
            "error": {
                "message": self.message,
                "type": kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class Limits:
    max_body_bytes: int = 32 * MiB  # a request body past this is refused with 413 before it is read
    max_image_bytes: int = 16 * MiB  # per image, data URI or download
    fetch_timeout_s: float = 10.0  # for http(s) image URLs
    allow_url_fetch: bool = True
    default_max_tokens: int = 512
    sessions: int = 8  # conversations kept for prefix reuse (least recently used dropped)


@dataclass
class Turn:
    role: str
    text: str
    images: list[bytes] = field(default_factory=list)

    def content(self) -> list[dict]:
        """The typed parts a chat session takes (images first, as llava-hf's templates put them); the text stays
        literal, so `<image>` typed in it is never an image slot."""
        return [{"type": "image"}] * len(self.images) + [{"type": "text", "text": self.text}]


# -- request parsing -----------------------------------------------------------------------------------
def _fetch(url: str, limits: Limits) -> bytes:
    if not limits.allow_url_fetch:
        raise RequestError(400, "image URLs are disabled on this server; send a data: URI", "messages")
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as r:  # noqa: S310 (http(s) only)
            size = r.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > limits.max_image_bytes:
                raise RequestError(413, f"image at {url} is {int(size):,} bytes, over {limits.max_image_bytes:,}")
            data = r.read(limits.max_image_bytes + 1)
    except RequestError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RequestError(400, f"could not fetch image {url}: {getattr(e, 'reason', e)}", "messages") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"image at {url} is over {limits.max_image_bytes:,} bytes")
    return data


def _image_bytes(part: dict, limits: Limits) -> bytes:
    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str):
        raise RequestError(400, "image_url part needs image_url.url (a data: URI or http(s) URL)", "messages")
    if url.startswith("data:"):
        head, sep, payload = url[5:].partition(",")
        if not sep or not head.startswith("image/") or not head.endswith(";base64"):
            raise RequestError(400, "image data URI must be data:image/<type>;base64,<data>", "messages")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(413, f"image data is over {limits.max_image_bytes:,} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image data URI is not valid base64", "messages") from None
    elif url.startswith(("http://", "https://")):
        data = _fetch(url, limits)
    else:
        raise RequestError(400, "image_url must be a data: URI or an http(s) URL", "messages")
    try:
        load_image(data)
    except ImageError as e:
        raise RequestError(400, f"image_url: {e}", "messages") from None
    return data


def _turn(i: int, m: Any, limits: Limits) -> Turn:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError(400, f"messages[{i}] must be an object with a role", "messages")
    role = "system" if m["role"] == "developer" else m["role"]
    if role not in ("system", "user", "assistant"):
        raise RequestError(400, f"messages[{i}].role {m['role']!r} is not supported (system, user, assistant)")
    content = m.get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and role == "user":
                images.append(_image_bytes(part, limits))
            else:
                raise RequestError(400, f"messages[{i}]: unsupported content part {kind!r}", "messages")
    elif not (content is None and role == "assistant"):
        raise RequestError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
    text = "".join(texts)
    if IMAGE in text:
        raise RequestError(400, f"messages[{i}]: text may not contain {IMAGE}; send images as image_url parts")
    return Turn(role, text, images)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"{name} must be {kind} in [{lo}, {hi}], got {v!r}", name)
    return v


@dataclass
class ChatRequest:
    system: str | None
    turns: list[Turn]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    turns = [_turn(i, m, limits) for i, m in enumerate(msgs)]
    system = None
    if turns[0].role == "system":
        system = turns.pop(0).text
    if any(t.role == "system" for t in turns):
        raise RequestError(400, "a system message is accepted only first", "messages")
    if not turns or turns[-1].role != "user":
        raise RequestError(400, "the last message must be from the user", "messages")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise RequestError(400, "n must be 1", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 30, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    return ChatRequest(
        system=system,
        turns=turns,
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        stop=stop,
        stream=stream,
        include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
    )


# -- generation ----------------------------------------------------------------------------------------
def _key(system: str | None, turns: list[Turn]) -> str:
    h = hashlib.sha256(json.dumps(system).encode())
    for t in turns:
        h.update(json.dumps([t.role, t.text]).encode())
        for im in t.images:
            h.update(hashlib.sha256(im).digest())
    return h.hexdigest()


class Engine:
    """The model, its processor and the conversations kept for reuse; one request at a time."""

    def __init__(self, model_dir: str, limits: Limits | None = None):
        from bonsai_mlx.generate import load

        self.model_dir = model_dir
        self.model, self.processor = load(model_dir)
        self.name = Path(model_dir).name or model_dir
        self.limits = limits or Limits()
        self.context = self.model.config.text.max_position_embeddings
        self.lock = threading.Lock()
        self.sessions: OrderedDict[str, Any] = OrderedDict()  # key of the conversation so far -> ChatSession
        self.created = int(time.time())

    def _session(self, req: ChatRequest):
        """The kept session whose conversation is exactly this request's earlier turns, else a fresh one."""
        from bonsai_mlx.generate import ChatSession

        earlier = req.turns[:-1]
        s = self.sessions.pop(_key(req.system, earlier), None)
        if s is None:
            s = ChatSession(self.model, self.processor, system=req.system)
            s.messages = [{"role": t.role, "content": t.content()} for t in earlier]
            s.images = [load_image(im) for t in earlier for im in t.images]
        last = req.turns[-1]
        s.messages.append({"role": "user", "content": last.content()})
        s.images.extend(load_image(im) for im in last.images)
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
        return req.max_tokens if req.max_tokens is not None else min(self.limits.default_max_tokens, room)

    def run(self, req: ChatRequest, max_tokens: int):
        """Yield (text delta, None) pieces, then (None, (finish_reason, usage)). Call under `self.lock`."""
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
        self.sessions[_key(req.system, req.turns + [Turn("assistant", text)])] = s
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


# -- HTTP ----------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server_version = "bonsai-mlx"
    engine: Engine
    api_key: str | None = None

    def log_message(self, fmt: str, *args) -> None:  # one line per request on stderr, no client addresses
        sys.stderr.write(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _auth(self) -> None:
        if self.api_key is None:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "invalid API key", code="invalid_api_key")

    def _handle(self, fn) -> None:
        try:
            self._auth()
            fn()
        except RequestError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:  # noqa: N802
        def models() -> None:
            if self.path.rstrip("/") not in ("/v1/models", f"/v1/models/{self.engine.name}"):
                raise RequestError(404, f"no route {self.path}")
            card = {"id": self.engine.name, "object": "model", "created": self.engine.created, "owned_by": "local"}
            self._json(200, {"object": "list", "data": [card]} if self.path.rstrip("/") == "/v1/models" else card)

        self._handle(models)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._chat)

    def _body(self) -> Any:
        size = self.headers.get("Content-Length")
        if size is None or not size.isdigit():
            raise RequestError(411 if size is None else 400, "a Content-Length header is required")
        if int(size) > self.engine.limits.max_body_bytes:
            self.close_connection = True  # the unread body is never consumed
            raise RequestError(413, f"request body is {int(size):,} bytes, over {self.engine.limits.max_body_bytes:,}")
        raw = self.rfile.read(int(size))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON ({e})") from None

    def _chat(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            raise RequestError(404, f"no route {self.path}")
        eng = self.engine
        req = parse_request(self._body(), eng.limits)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": eng.name, "system_fingerprint": None}
        with eng.lock:  # the queue: one generation at a time, each in its own session
            max_tokens = eng.check(req)
            if not req.stream:
                text, done = "", None
                for piece, end in eng.run(req, max_tokens):
                    text, done = text + (piece or ""), end or done
                reason, usage = done
                msg = {"role": "assistant", "content": text}
                choice = {"index": 0, "message": msg, "finish_reason": reason, "logprobs": None}
                self._json(200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, reason: str | None = None, usage: dict | None = None) -> None:
                choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
                body = {**base, "object": "chat.completion.chunk", "choices": choices}
                if usage:
                    body["usage"] = usage
                self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant", "content": ""})
            gen = eng.run(req, max_tokens)
            try:
                for piece, end in gen:
                    if piece:
                        event({"content": piece})
                    if end:
                        event({}, end[0])
                        if req.include_usage:
                            event({}, usage=end[1])
            finally:
                gen.close()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()


def make_server(
    model_dir: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None, limits: Limits | None = None
) -> ThreadingHTTPServer:
    engine = Engine(model_dir, limits)
    handler = type("PicoHandler", (Handler,), {"engine": engine, "api_key": api_key})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.server", description="Serve a Pico over an OpenAI-compatible chat API."
    )
    ap.add_argument("--model", required=True, help="Pico directory or hub id")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed)")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    ap.add_argument("--max-body-mb", type=float, default=32.0, help="larger request bodies get 413")
    ap.add_argument("--max-image-mb", type=float, default=16.0, help="per image (data URI or download)")
    ap.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds to fetch an http(s) image URL")
    ap.add_argument("--no-url-fetch", action="store_true", help="accept only data: URIs for images")
    ap.add_argument("--max-tokens", type=int, default=512, help="completion length when a request sets none")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from bonsai_mlx.core.errors import friendly

    limits = Limits(
        max_body_bytes=int(a.max_body_mb * MiB),
        max_image_bytes=int(a.max_image_mb * MiB),
        fetch_timeout_s=a.fetch_timeout,
        allow_url_fetch=not a.no_url_fetch,
        default_max_tokens=a.max_tokens,
    )
    with friendly("server"):
        server = make_server(a.model, a.host, a.port, a.api_key, limits)
    host, port = server.server_address[:2]
    print(f"serving {a.model} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
