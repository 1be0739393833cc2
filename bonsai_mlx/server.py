"""python -m bonsai_mlx.server: an OpenAI-compatible chat API over a Pico (`POST /v1/chat/completions`,
`GET /v1/models`), binding 127.0.0.1 unless told otherwise.

It runs the same generation code as the CLI and the app (`bonsai_mlx.generate.ChatSession`, on MLX or llama.cpp:
`--engine`, bonsai_mlx.engines), in one engine thread
that answers requests in turn from a bounded waiting line (`bonsai_mlx.serving.engine`); each HTTP thread only
parses, ingests images and copies its answer from a bounded queue to its socket, so no lock is held across a
socket write. The bounds (waiting line, connections, request/read/write deadlines, images and pixels per request,
image URLs) are `serving.config.Limits`, each a flag.

Why the standard library's `http.server` and not uvicorn + Starlette: the model runs on one thread either way
(MLX work must not be spread over threads), so asyncio would only add a thread-to-loop bridge; the stdlib's
blocking sockets give read and write timeouts per connection directly, and a watchdog gives a whole-request read
deadline, which uvicorn has no setting for (its `timeout_keep_alive` is reset by every byte received, so a
client trickling bytes holds a connection indefinitely); a thread per connection, capped, is affordable at the
connection counts one model on one machine can serve; and the MLX side keeps no dependency beyond its own
(gradio, which brings uvicorn, is the app's extra, not the server's).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from bonsai_mlx.core.cli import add_options, from_args
from bonsai_mlx.engines import EngineConfig, stderr_log
from bonsai_mlx.serving.config import Limits, ServeConfig
from bonsai_mlx.serving.engine import Engine
from bonsai_mlx.serving.httpd import make_server
from bonsai_mlx.serving.request import RequestError, parse_request

__all__ = ["Engine", "Limits", "RequestError", "ServeConfig", "main", "make_server", "parse_request", "parser"]


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server will be reachable from other machines with no API key."""
    if api_key:
        return None
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        addrs = set()
    if addrs and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs):
        return None
    return (
        f"warning: binding {host}, reachable beyond this machine, with no --api-key: anyone who can reach the port "
        "can use the model (add --api-key KEY, or bind 127.0.0.1)"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.server", description="Serve a Pico over an OpenAI-compatible chat API."
    )
    add_options(ap, ServeConfig, required=["model"])
    add_options(ap.add_argument_group("engine"), EngineConfig)
    add_options(ap.add_argument_group("limits"), Limits)
    ap.add_argument("--no-url-fetch", dest="url_fetch", action="store_const", const="off", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from bonsai_mlx.core.errors import friendly

    cfg, limits, engine = from_args(ServeConfig, a), from_args(Limits, a), from_args(EngineConfig, a)
    with friendly("server"):  # the engine's choice line (which, and why) goes to stderr first
        server = make_server(cfg.model, cfg.host, cfg.port, cfg.api_key, limits, engine, log=stderr_log)
    if warning := exposure_warning(cfg.host, cfg.api_key):
        print(warning, file=sys.stderr, flush=True)
    host, port = server.server_address[:2]
    print(f"serving {cfg.model} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
