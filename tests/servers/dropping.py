"""A forward HTTP proxy that drops every kept-alive connection at its second request.

It relays a connection's first request to the target and answers it keep-alive; when
the client sends a second request on that connection, it reads it and closes the
socket without a word.  That is the race real proxies lose every day (an idle
keep-alive connection closed just as the client reuses it), made to happen every time.
"""

from __future__ import annotations

import http.client
import socketserver
import threading
from types import TracebackType
from urllib.parse import urlsplit


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        served = 0
        while True:
            head = self._read_head()
            if head is None:
                return
            if served:
                with self.server.lock:
                    self.server.dropped += 1
                return  # closed without a response
            self._relay(head)
            served += 1

    def _read_head(self) -> list[str] | None:
        lines: list[str] = []
        while True:
            line = self.rfile.readline(65537)
            if not line:
                return None
            if line in (b"\r\n", b"\n"):
                return lines
            lines.append(line.decode("latin-1").rstrip("\r\n"))

    def _relay(self, head: list[str]) -> None:
        method, target, _ = head[0].split(" ", 2)
        url = urlsplit(target)
        headers = dict(line.split(":", 1) for line in head[1:])
        length = int(headers.get("Content-Length", "0").strip() or 0)
        body = self.rfile.read(length) if length else None
        skip = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
        forward = {k.strip(): v.strip() for k, v in headers.items() if k.strip().lower() not in skip}
        upstream = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=10)
        try:
            upstream.request(method, url.path + (f"?{url.query}" if url.query else ""), body=body, headers=forward)
            answer = upstream.getresponse()
            payload = answer.read()
            status = answer.status
            reason = answer.reason
        finally:
            upstream.close()
        with self.server.lock:
            self.server.relayed += 1
        self.wfile.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n".encode()
            + payload
        )
        self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.relayed = 0
        self.dropped = 0


class DroppingProxy:
    """``with DroppingProxy() as proxy: proxy.url``; counts ``relayed`` and ``dropped`` requests."""

    def __init__(self) -> None:
        self._server = _Server()
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def relayed(self) -> int:
        return self._server.relayed

    @property
    def dropped(self) -> int:
        return self._server.dropped

    def __enter__(self) -> DroppingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._server.shutdown()
        self._server.server_close()
