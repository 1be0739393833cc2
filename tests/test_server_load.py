"""The server under a mixed load on loopback: 16 clients at once for a fixed time, bounded in all.

Normal clients (a small image, 16 tokens, streamed or not) share the server with clients that read slowly, one
that stops reading altogether, clients that leave mid-answer and clients that send oversized images. The
normal ones must all be answered (their latency p50/p95 is printed), the server's RSS must stay bounded, and
every client thread must finish: nothing hangs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import image
from PIL import Image

DURATION_S = 30.0  # clients start new requests for this long
GRACE_S = 45.0  # then every client must be done within this
MAX_RSS_GROWTH_MB = 300.0  # from the warmed-up server to the end of the load


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc, else ps)."""
    status = Path(f"/proc/{pid}/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return int(subprocess.check_output(["ps", "-o", "rss=", "-p", str(pid)]).strip()) / 1024


def png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def body(n: int, stream: bool = False, images: tuple[bytes, ...] = ()) -> bytes:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b).decode()}}
        for b in images
    ]
    msg = {"role": "user", "content": [*parts, {"type": "text", "text": "Describe the image."}]}
    return json.dumps({"messages": [msg], "max_tokens": n, "temperature": 0, "stream": stream}).encode()


class Client:
    """HTTP/1.1 on a bare socket, so a client can read slowly, stop reading, or leave."""

    def __init__(self, port: int, data: bytes, rcvbuf: int | None = None, timeout: float = 60.0):
        self.s = socket.socket()
        if rcvbuf:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.s.settimeout(timeout)
        self.s.connect(("127.0.0.1", port))
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: l\r\nContent-Length: {len(data)}\r\n\r\n"
        self.s.sendall(head.encode() + data)

    def read_all(self, chunk: int = 1 << 16, pause: float = 0.0) -> bytes:
        out = b""
        while True:
            got = self.s.recv(chunk)
            if not got:
                break
            out += got
            if pause:
                time.sleep(pause)
        self.s.close()
        return out


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


@pytest.fixture(scope="module")
def server(pico_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "bonsai_mlx.server", "--model", str(pico_dir), "--port", "0"]
    cmd += ["--write-timeout", "2", "--read-timeout", "5", "--request-timeout", "60", "--max-waiting", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    assert "serving" in line, line
    yield proc.pid, int(line.strip().rsplit(":", 1)[1].split("/")[0])
    proc.terminate()
    proc.wait(timeout=20)


def test_sixteen_clients_of_every_kind(server):
    pid, port = server
    small = png(image(1, (64, 48)))
    bomb = png(Image.new("1", (8000, 8000)))  # 64 megapixels in ~250 KB
    for stream in (False, True):  # warm up (first-call compilation, caches), then take the baseline
        assert status(Client(port, body(16, stream, (small,))).read_all()) == 200
    base_rss = rss_mb(pid)
    stop_at = time.monotonic() + DURATION_S
    lat: list[float] = []
    bad: list[str] = []
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def note(kind: str, problem: str | None = None) -> None:
        with lock:
            counts[kind] = counts.get(kind, 0) + 1
            if problem:
                bad.append(f"{kind}: {problem}")

    def normal(i: int) -> None:
        while time.monotonic() < stop_at:
            t = time.monotonic()
            reply = Client(port, body(16, i % 2 == 1, (small,))).read_all()
            ok = status(reply) == 200 and (b"[DONE]" in reply if i % 2 else b'"completion_tokens": 16' in reply)
            with lock:
                lat.append(time.monotonic() - t)
            note("normal", None if ok else reply[:200].decode(errors="replace"))

    def slow_reader() -> None:
        while time.monotonic() < stop_at:
            reply = Client(port, body(200, True, (small,))).read_all(chunk=256, pause=0.02)
            note("slow reader", None if status(reply) == 200 and b"[DONE]" in reply else reply[:200].decode())

    def stalled_reader() -> None:
        while time.monotonic() < stop_at:
            c = Client(port, body(2000, True, (small,)), rcvbuf=4096)
            time.sleep(8)  # reads nothing meanwhile (test_hardening checks that it is dropped, without the crowd)
            reply = c.read_all()
            note("stalled reader, dropped" if b"[DONE]" not in reply else "stalled reader, not yet started or done")

    def leaver(i: int) -> None:
        while time.monotonic() < stop_at:
            c = Client(port, body(1000, i % 2 == 0, (small,)))
            if i % 2 == 0:
                c.s.recv(64)  # the stream has started
            else:
                time.sleep(0.3)
            c.s.close()
            note("leaver")
            time.sleep(0.5)

    def oversized(i: int) -> None:
        while time.monotonic() < stop_at:
            if i % 2 == 0:
                reply, want = Client(port, body(4, False, (bomb, bomb))).read_all(), 413
            else:
                reply, want = Client(port, body(4, False, (small,) * 9)).read_all(), 400
            note("oversized", None if status(reply) == want else reply[:200].decode(errors="replace"))
            time.sleep(0.2)

    peak = [base_rss]

    def watch() -> None:
        while time.monotonic() < stop_at + GRACE_S and any(t.is_alive() for t in clients):
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.2)

    clients = [threading.Thread(target=normal, args=(i,)) for i in range(8)]
    clients += [threading.Thread(target=slow_reader) for _ in range(2)]
    clients += [threading.Thread(target=stalled_reader)]
    clients += [threading.Thread(target=leaver, args=(i,)) for i in range(3)]
    clients += [threading.Thread(target=oversized, args=(i,)) for i in range(2)]
    assert len(clients) == 16
    t0 = time.monotonic()
    for t in clients:
        t.daemon = True
        t.start()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for t in clients:
        t.join(timeout=max(0.0, stop_at + GRACE_S - time.monotonic()))
    hung = sum(t.is_alive() for t in clients)
    wall = time.monotonic() - t0
    end_rss = rss_mb(pid)
    lat.sort()
    p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
    print(
        f"\nload: {wall:.1f} s, 16 clients; requests by kind {counts}; normal latency p50 {p50:.2f} s, "
        f"p95 {p95:.2f} s, max {lat[-1]:.2f} s over {len(lat)}; server RSS {base_rss:.0f} MB after warm-up, "
        f"peak {peak[0]:.0f} MB, end {end_rss:.0f} MB"
    )
    assert hung == 0, f"{hung} client threads still running"
    assert not bad, bad[:5]
    assert counts.get("normal", 0) >= 16 and counts.get("leaver", 0) >= 3
    assert p95 < 30.0  # (on 2 shared cores; one stalled reader may hold the engine for --write-timeout at a time)
    assert peak[0] - base_rss < MAX_RSS_GROWTH_MB
    assert status(Client(port, body(4, False, (small,))).read_all()) == 200  # and it still serves
