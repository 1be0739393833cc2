"""A chat request: parsed and checked before any image is fetched or decoded, so a bad one costs little."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from bonsai_mlx.core.processing import IMAGE
from bonsai_mlx.serving.config import Limits


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
            501: "invalid_request_error",
        }
        return {
            "error": {
                "message": self.message,
                "type": kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class Turn:
    role: str
    text: str
    images: list = field(default_factory=list)  # bytes or a URL when parsed; images.Picture once ingested

    def content(self) -> list[dict]:
        """The typed parts a chat session takes (images first, as llava-hf's templates put them); the text stays
        literal, so `<image>` typed in it is never an image slot."""
        return [{"type": "image"}] * len(self.images) + [{"type": "text", "text": self.text}]


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

    def key(self, turns: list[Turn] | None = None) -> str:
        """Identity of a conversation (these turns, default all): text and image digests."""
        h = hashlib.sha256(json.dumps(self.system).encode())
        for t in self.turns if turns is None else turns:
            h.update(json.dumps([t.role, t.text]).encode())
            for im in t.images:
                h.update(im.digest)
        return h.hexdigest()


def _image_source(part: dict, limits: Limits) -> bytes | str:
    """A data URI's bytes (decoded, size-checked) or an http(s) URL to fetch later."""
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
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image data URI is not valid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        if limits.url_fetch == "off":
            raise RequestError(400, "image URLs are disabled on this server; send a data: URI", "messages")
        return url
    raise RequestError(400, "image_url must be a data: URI or an http(s) URL", "messages")


def _turn(i: int, m: Any, limits: Limits) -> Turn:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError(400, f"messages[{i}] must be an object with a role", "messages")
    role = "system" if m["role"] == "developer" else m["role"]
    if role not in ("system", "user", "assistant"):
        raise RequestError(400, f"messages[{i}].role {m['role']!r:.40} is not supported (system, user, assistant)")
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
                images.append(_image_source(part, limits))
            else:
                raise RequestError(400, f"messages[{i}]: unsupported content part {kind!r:.40}", "messages")
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
        raise RequestError(400, f"{name} must be {kind} in [{lo}, {hi}], got {v!r:.40}", name)
    return v


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    """Check a chat-completions body; images stay undecoded (bytes or URLs) and are counted against the cap."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    n_images = sum(
        1
        for m in msgs
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image_url"
    )
    if n_images > limits.max_images:
        raise RequestError(400, f"{n_images} images in one request; this server takes at most {limits.max_images}")
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
