"""Image URLs, fetched only when the server is told to, and then only from public addresses.

A server that fetches any URL it is sent is, once reachable from a network, a proxy into that network (SSRF) and,
through its error texts, a port scanner. So: http(s) only; the host is resolved once and every address it
resolves to must be public (not private, loopback, link-local, multicast or reserved), and the connection goes
to that checked address (a second lookup could answer differently); no redirects; and every failure reads the
same, whatever its cause. `url_fetch="any"` drops the address check, for a trusted network.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit

from bonsai_mlx.serving.config import Limits
from bonsai_mlx.serving.request import RequestError

FAILED = "could not fetch the image URL (only public http(s) addresses that answer 200 in time are fetched)"


def is_public(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_global and not a.is_multicast


def _address(host: str, port: int, public_only: bool) -> str:
    """The one address to connect to: the first the host resolves to, after checking all of them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips = [info[4][0] for info in infos]
    if not ips or (public_only and not all(is_public(ip) for ip in ips)):
        raise OSError("not a public address")
    return ips[0]


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    """The same over TLS: the certificate is checked against the URL's host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _read(r: http.client.HTTPResponse, cap: int, deadline: float) -> bytes:
    """Up to `cap` bytes, all within the deadline (a server that trickles bytes would beat a per-read timeout)."""
    data = bytearray()
    while len(data) < cap:
        if time.monotonic() > deadline:
            raise TimeoutError("download too slow")
        block = r.read(min(1 << 16, cap - len(data)))
        if not block:
            break
        data += block
    return bytes(data)


def fetch(url: str, limits: Limits) -> bytes:
    """The bytes at `url`, or RequestError: 400 with FAILED for any failure, 413 over the image size cap."""
    if limits.url_fetch == "off":
        raise RequestError(400, "image URLs are disabled on this server; send a data: URI", "messages")
    conn = None
    try:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("not an http(s) URL")
        port = u.port or (443 if u.scheme == "https" else 80)
        ip = _address(u.hostname, port, public_only=limits.url_fetch != "any")
        cls = _PinnedTLS if u.scheme == "https" else _Pinned
        conn = cls(u.hostname, port, ip, limits.fetch_timeout)
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""), headers={"Accept": "image/*"})
        r = conn.getresponse()
        if r.status != 200:  # redirects included: never followed
            raise OSError(f"status {r.status}")
        size = r.getheader("Content-Length")
        if size is not None and size.isdigit() and int(size) > limits.max_image_bytes:
            raise RequestError(413, f"the image at that URL is over {limits.max_image_bytes:,} bytes")
        data = _read(r, limits.max_image_bytes + 1, time.monotonic() + limits.fetch_timeout)
    except RequestError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        print(f"image fetch failed: {type(e).__name__}: {e}", file=sys.stderr)  # the operator's log, not the client
        raise RequestError(400, FAILED, "messages") from None
    finally:
        if conn is not None:
            conn.close()
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"the image at that URL is over {limits.max_image_bytes:,} bytes")
    return data
