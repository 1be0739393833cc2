"""The server's settings: one dataclass each, from which `python -m bonsai_mlx.server` builds its flags
(bonsai_mlx.core.cli), so a default and its help are written once."""

from __future__ import annotations

from dataclasses import dataclass

from bonsai_mlx.core.cli import opt

MiB = 1 << 20


@dataclass
class ServeConfig:
    model: str = opt(help="Pico directory or hub id")
    host: str = opt("127.0.0.1", "address to bind (the default: this machine only)")
    port: int = opt(8080, "port to bind; 0 picks a free one (printed)")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on every request")


@dataclass
class Limits:
    """What one request, one client and the waiting line may cost. Each bound answers a way a careless or hostile
    client could otherwise stall the server or grow its memory."""

    max_body_mb: float = opt(32.0, "request bodies over this get 413, before they are read")
    max_image_mb: float = opt(16.0, "per image, data URI or download (413 over it)")
    max_images: int = opt(8, "images per request, all turns together (a request resends its whole conversation)")
    max_pixels: int = opt(
        32_000_000, "decoded pixels per request, all images together, read from each image's header before decoding"
    )
    url_fetch: str = opt(
        "off",
        "http(s) image URLs: off; public (hosts that resolve to public addresses only, no redirects); any (private "
        "and loopback hosts too: only on a network you trust)",
        choices=("off", "public", "any"),
    )
    fetch_timeout: float = opt(10.0, "seconds to fetch an image URL")
    max_tokens: int = opt(512, "completion length when a request sets none")
    sessions: int = opt(8, "conversations kept for prefix reuse (least recently used dropped)")
    max_waiting: int = opt(16, "requests waiting for the model besides the one being answered; more get 429")
    max_connections: int = opt(64, "open connections; more get 503 at once")
    read_timeout: float = opt(30.0, "seconds for a request's headers and body to arrive, in all")
    write_timeout: float = opt(
        30.0, "seconds a write to a client may stall; a client that stops reading is dropped, its answer cancelled"
    )
    request_timeout: float = opt(300.0, "seconds from a request's arrival to its last token, waiting included")
    stream_buffer: int = opt(64, "answer pieces held for a client that reads slowly", cli=False)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MiB)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MiB)
