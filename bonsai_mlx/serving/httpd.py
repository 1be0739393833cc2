"""HTTP for the engine, on the standard library's threaded server, with the bounds a public socket needs.

Each connection gets a thread (at most `max_connections`; more are answered 503 at once and closed), a socket
timeout for every read and write (`write_timeout`), and a deadline for its whole request to arrive
(`read_timeout`, enforced by one watchdog thread: a client trickling a byte at a time beats a per-read timeout).
Every failure is answered with OpenAI-style error JSON; an unexpected one is logged with its traceback and
answered 500, and the server goes on.
"""

from __future__ import annotations

import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bonsai_mlx.serving.config import Limits
from bonsai_mlx.serving.engine import Engine, Job, timeout_error
from bonsai_mlx.serving.request import RequestError, parse_request

SEND_BUFFER = 64 << 10


class ClientGone(Exception):
    """The client closed its connection or stopped reading: nobody to answer."""


class Watchdog:
    """Shuts down connections whose request has not fully arrived by its deadline."""

    def __init__(self):
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="read-deadlines", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def arm(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[id(sock)] = (time.monotonic() + seconds, sock)

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(id(sock), None)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                late = [k for k, (t, _) in self._due.items() if t < now]
                socks = [self._due.pop(k)[1] for k in late]
            for s in socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def gone(sock: socket.socket) -> bool:
    """Whether the peer has closed its end (readable with nothing to read), without consuming anything."""
    try:
        poll = select.poll()  # (select.select fails on descriptors past 1023)
        poll.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        events = poll.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR):
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Budget:
    """Bytes of request bodies held at once, all connections together: connections x body cap would otherwise
    bound memory (64 x 32 MiB), and a request waits for room instead."""

    def __init__(self, total: int):
        self.free = total
        self._cv = threading.Condition()

    def take(self, n: int, timeout: float) -> bool:
        with self._cv:
            if not self._cv.wait_for(lambda: self.free >= n, timeout):
                return False
            self.free -= n
            return True

    def give(self, n: int) -> None:
        with self._cv:
            self.free += n
            self._cv.notify_all()


class Handler(BaseHTTPRequestHandler):
    server_version = "bonsai-mlx"
    engine: Engine
    api_key: str | None = None
    watchdog: Watchdog

    @property
    def limits(self) -> Limits:
        return self.engine.limits

    # -- connection -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.timeout = self.limits.write_timeout  # every socket read and write (StreamRequestHandler applies it)
        # a small kernel send buffer: a client that stops reading is noticed after ~64 KiB, not after the megabytes
        # Linux would otherwise buffer for it (answers are token streams; they never need more)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        super().setup()
        self.watchdog.arm(self.connection, self.limits.read_timeout)
        self._started = False  # response headers sent
        self._checked = 0.0  # when the client was last seen to be there

    def finish(self) -> None:
        self.watchdog.disarm(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt: str, *args) -> None:  # one line per request on stderr, no client addresses
        method, path = getattr(self, "command", None), getattr(self, "path", "")  # (unset on a malformed line)
        sys.stderr.write(f"{method} {path[:100]} {args[1] if len(args) > 1 else ''}\n")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, a header too long) as error JSON."""
        self.close_connection = True
        try:
            self._json(code, RequestError(code, message or "bad request").body())
        except OSError:
            pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
        self.end_headers()
        self._started = True
        self.wfile.write(data)

    def _event(self, body: dict | str) -> None:
        text = body if isinstance(body, str) else json.dumps(body)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    # -- dispatch -----------------------------------------------------------------------------------------------
    def _handle(self, fn) -> None:
        try:
            self._auth()
            fn()
        except RequestError as e:
            self._refuse(e)
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True  # nobody left to answer
        except Exception:  # a bug: logged with its traceback, answered 500; the server goes on
            traceback.print_exc()
            self._refuse(RequestError(500, "internal error (see the server's log)", code="internal"))

    def _refuse(self, e: RequestError) -> None:
        self.close_connection = True
        try:
            if not self._started:
                self._json(e.status, e.body())
            else:  # mid-stream: the error as an event, as OpenAI streams send it
                self._event(e.body())
                self._event("[DONE]")
        except OSError:
            pass

    def _auth(self) -> None:
        if self.api_key is None:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "invalid API key", code="invalid_api_key")

    def do_GET(self) -> None:  # noqa: N802
        self.watchdog.disarm(self.connection)

        def models() -> None:
            path = self.path.rstrip("/")
            if path not in ("/v1/models", f"/v1/models/{self.engine.name}"):
                raise RequestError(404, f"no route {self.path[:100]}")
            card = {"id": self.engine.name, "object": "model", "created": self.engine.created, "owned_by": "local"}
            self._json(200, {"object": "list", "data": [card]} if path == "/v1/models" else card)

        self._handle(models)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._chat)

    def _size(self) -> int:
        size = self.headers.get("Content-Length")
        if size is None or not size.isdigit():
            raise RequestError(411 if size is None else 400, "a Content-Length header is required")
        if int(size) > self.limits.max_body_bytes:
            raise RequestError(413, f"request body is {int(size):,} bytes, over {self.limits.max_body_bytes:,}")
        return int(size)

    def _body(self, size: int) -> Any:
        raw = self.rfile.read(size)
        if len(raw) < size:
            raise ClientGone()  # cut off, or too slow (the read deadline shut the socket)
        self.watchdog.disarm(self.connection)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON ({e})") from None
        except RecursionError:
            raise RequestError(400, "request body nests too deeply") from None

    # -- chat -----------------------------------------------------------------------------------------------------
    def _chat(self) -> None:
        arrived = time.monotonic()
        if self.path.rstrip("/") != "/v1/chat/completions":
            raise RequestError(404, f"no route {self.path[:100]}")
        eng = self.engine
        size = self._size()
        if not self.server.bodies.take(size, self.limits.read_timeout):
            raise RequestError(503, "too many large requests arriving at once; retry later", code="busy")
        try:
            req = parse_request(self._body(size), eng.limits)
            eng.check_line()  # a full line refuses before any image is fetched or decoded
            eng.ingest.resolve(req)  # fetch, size-check, decode and shrink the images, outside the engine
        finally:
            self.server.bodies.give(size)  # from here on the request holds only its images' arrays
        job = eng.submit(req, arrived)
        try:
            self._answer(job)
        finally:
            job.cancel.set()  # answered, refused or abandoned: the worker drops it either way

    def _next(self, job: Job) -> tuple[str, Any]:
        """The job's next item; meanwhile (and every 0.1 s while items flow), watch for the client leaving and
        for the deadline."""
        while True:
            try:
                item = job.out.get(timeout=0.1)
            except queue.Empty:
                item = None
            now = time.monotonic()
            if item is None or now > self._checked + 0.1:
                self._checked = now
                if gone(self.connection):
                    raise ClientGone()
                if now > job.deadline + 1.0:  # (the worker's own check comes first)
                    raise timeout_error(self.limits)
            if item is not None:
                return item

    def _answer(self, job: Job) -> None:
        eng, req = self.engine, job.req
        kind, value = self._next(job)
        if kind == "error":
            raise value
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": eng.name}
        base["system_fingerprint"] = None
        if not req.stream:
            text = ""
            while (item := self._next(job))[0] == "piece":
                text += item[1]
            if item[0] == "error":
                raise item[1]
            reason, usage = item[1]
            msg = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": msg, "finish_reason": reason, "logprobs": None}
            self._json(200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self._started = True
        self.close_connection = True

        def event(delta: dict, reason: str | None = None, usage: dict | None = None) -> None:
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
            body = {**base, "object": "chat.completion.chunk", "choices": choices}
            if usage:
                body["usage"] = usage
            self._event(body)

        event({"role": "assistant", "content": ""})
        while True:
            kind, value = self._next(job)
            if kind == "error":
                raise value
            if kind == "piece":
                event({"content": value})
                continue
            event({}, value[0])
            if req.include_usage:
                event({}, usage=value[1])
            break
        self._event("[DONE]")


class Server(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them; beyond, a 503 and the door closed."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address, handler, limits: Limits):
        self.limits = limits
        self.bodies = Budget(2 * limits.max_body_bytes)
        self._open = 0
        self._count = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        with self._count:
            full = self._open >= self.limits.max_connections
            if not full:
                self._open += 1
        if full:
            body = json.dumps(RequestError(503, "too many open connections; retry later", code="busy").body())
            head = f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            try:
                request.settimeout(1.0)
                request.sendall(f"{head}\r\nConnection: close\r\n\r\n{body}".encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.RequestHandlerClass.engine.close()
        self.RequestHandlerClass.watchdog.stop()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count:
                self._open -= 1


def make_server(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    limits: Limits | None = None,
    engine_config=None,
    log=None,
) -> Server:
    engine = Engine(model_dir, limits, engine_config, log=log)
    attrs = {"engine": engine, "api_key": api_key, "watchdog": Watchdog()}
    return Server((host, port), type("PicoHandler", (Handler,), attrs), engine.limits)
