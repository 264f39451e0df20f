"""A real HTTP/HTTPS target server that can tell proxies apart by peer IP.

Each kit proxy connects out from its own loopback address, so the peer IP the
target sees identifies the proxy: banning one IP bans exactly one proxy, and
``hits`` counts requests per proxy. Runs in threads of the test process so the
control API is plain Python, and stays off any Twisted/asyncio loop.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: Byte pattern repeated by ``/bytes`` so a client can check what it streamed.
BYTES_PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Errors a client causes by hanging up early; they are normal in fault tests.
_CLIENT_GONE = (ConnectionError, TimeoutError, ssl.SSLError, BrokenPipeError)


def expected_bytes(n: int) -> bytes:
    """The exact body ``/bytes?n=<n>`` sends."""
    reps = n // len(BYTES_PATTERN) + 1
    return (BYTES_PATTERN * reps)[:n]


@dataclass(frozen=True)
class SeenRequest:
    """One request as the target received it (headers keep their received case)."""

    peer_ip: str
    method: str
    path: str
    headers: dict[str, str]
    tls: bool
    body: bytes = b""  # the request body exactly as received (de-chunked)
    at: float = 0.0  # time.monotonic() when its head arrived


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    bans: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    requests: list[SeenRequest] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # The default backlog of 5 refuses bursts of 50+ concurrent connections.
    request_queue_size = 512

    def __init__(self, state: _State, ssl_context: ssl.SSLContext | None, host: str = "127.0.0.1") -> None:
        self.state = state
        self.ssl_context = ssl_context
        super().__init__((host, 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake here, in the per-connection thread, so one stalled
        # client cannot block the accept loop.
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(10)
        try:
            tls_sock = self.ssl_context.wrap_socket(request, server_side=True)
        except (*_CLIENT_GONE, OSError):
            return
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            tls_sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (*_CLIENT_GONE, OSError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # Idle keep-alive connections are closed after this many seconds.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # Every method goes through the same router.
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        arrived = time.monotonic()
        body = self._read_body()
        peer_ip = self.client_address[0]
        state = self.server.state
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        parts = urlsplit(self.path)
        with state.lock:
            state.hits[peer_ip] += 1
            state.requests.append(
                SeenRequest(
                    peer_ip, self.command, self.path, headers, self.server.ssl_context is not None, body, arrived
                )
            )
            banned = state.bans.get(peer_ip)
        if banned is not None:
            self._send(banned[0], b"banned\n", "text/plain", banned[1])
            return
        query = parse_qs(parts.query)
        path = parts.path

        def arg(name: str, default: int) -> int:
            return int(query.get(name, [default])[0])

        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            self._send(code, f"status {code}\n".encode(), "text/plain")
        elif path == "/echo":
            payload = {
                "method": self.command,
                "path": path,
                "query": parts.query,
                "args": query,
                "headers": headers,
                "peer_ip": peer_ip,
                "peer_port": self.client_address[1],
                "tls": self.server.ssl_context is not None,
                "body": body.decode("utf-8", "replace"),
            }
            self._send(200, json.dumps(payload).encode(), "application/json")
        elif path == "/slow":
            ms = arg("ms", 1000)
            time.sleep(ms / 1000)
            self._send(200, json.dumps({"slept_ms": ms}).encode(), "application/json")
        elif path == "/drop":
            # No status line at all: the client sees the connection close.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif path == "/bytes":
            self._send_chunked(arg("n", 1024), max(1, arg("chunk", 8192)), arg("delay_ms", 0))
        elif path.startswith("/page/"):
            self._send_page(int(path.rsplit("/", 1)[1]), arg("n", 15))
        elif path == "/redirect":
            to = query.get("to", ["/echo"])[0]
            self._send(arg("code", 302), b"", "text/plain", extra={"Location": to})
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        no_body = code in (204, 304) or 100 <= code < 200
        self.send_response(code)
        self._say_if_closing()
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if not no_body:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and not no_body:
            self.wfile.write(body)

    def _say_if_closing(self) -> None:
        # The client (or a proxy) asked for close: tell it so it will not try
        # to reuse the connection.
        if self.close_connection:
            self.send_header("Connection", "close")

    def _send_chunked(self, n: int, chunk: int, delay_ms: int) -> None:
        self.send_response(200)
        self._say_if_closing()
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        data = expected_bytes(n)
        for start in range(0, n, chunk):
            piece = data[start : start + chunk]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            if delay_ms:
                time.sleep(delay_ms / 1000)
        self.wfile.write(b"0\r\n\r\n")

    def _send_page(self, i: int, n: int) -> None:
        links = "".join(
            f'<li><a href="/page/{child}?n={n}">page {child}</a></li>' for child in (2 * i + 1, 2 * i + 2) if child < n
        )
        html = (
            f"<!DOCTYPE html><html><head><title>page {i}</title></head>"
            f"<body><h1>page {i}</h1><ul>{links}</ul></body></html>"
        )
        self._send(200 if i < n else 404, html.encode(), "text/html; charset=utf-8")


class TargetServer:
    """Threaded HTTP/1.1 (or HTTPS) target on 127.0.0.1 (or `host`, another loopback
    address: a second site) with an ephemeral port.

    Endpoints: ``/status/<code>``, ``/echo``, ``/slow?ms=N``, ``/drop``,
    ``/bytes?n=N&chunk=K[&delay_ms=D]``, ``/page/<i>?n=N``,
    ``/redirect?to=<path>[&code=302]``. Any method works on any endpoint.
    """

    def __init__(
        self, ssl_context: ssl.SSLContext | None = None, ca_bundle: str | None = None, host: str = "127.0.0.1"
    ) -> None:
        self._state = _State()
        self._server = _Server(self._state, ssl_context, host)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kit-target-{self.port}",
            daemon=True,
        )
        self._thread.start()
        #: PEM file of the throw-away CA that signed the HTTPS certificate.
        self.ca_bundle = ca_bundle

    @property
    def scheme(self) -> str:
        return "https" if self._server.ssl_context is not None else "http"

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123``."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def ban(self, ip: str, status: int = 403, retry_after: str | None = None) -> None:
        """Answer every request from peer ``ip`` with ``status`` (and a ``Retry-After``
        header, when given) until unbanned."""
        with self._state.lock:
            self._state.bans[ip] = (status, {} if retry_after is None else {"Retry-After": retry_after})

    def unban(self, ip: str) -> None:
        with self._state.lock:
            self._state.bans.pop(ip, None)

    @property
    def hits(self) -> Counter[str]:
        """Requests received per peer IP (a copy)."""
        with self._state.lock:
            return Counter(self._state.hits)

    @property
    def requests(self) -> list[SeenRequest]:
        """Every request received since the last reset (a copy)."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def seen_headers(self) -> list[dict[str, str]]:
        """The header dicts of every request received, in arrival order."""
        return [r.headers for r in self.requests]

    def saw_header(self, name: str) -> bool:
        """Whether any request carried header ``name`` (case-insensitive)."""
        low = name.lower()
        return any(k.lower() == low for h in self.seen_headers for k in h)

    def reset(self) -> None:
        """Forget bans, hits and recorded requests."""
        with self._state.lock:
            self._state.bans.clear()
            self._state.hits.clear()
            self._state.requests.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __repr__(self) -> str:
        return f"<TargetServer {self.url}>"


def make_tls_target(directory: str) -> TargetServer:
    """An HTTPS target whose certificate (for 127.0.0.1 and localhost) is signed by
    a fresh trustme CA; the CA's PEM is written to ``directory``."""
    import os

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    bundle = os.path.join(directory, "kit-ca.pem")
    ca.cert_pem.write_to_path(bundle)
    return TargetServer(ctx, ca_bundle=bundle)
