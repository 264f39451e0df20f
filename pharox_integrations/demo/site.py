"""The demo's local web sites: a small catalogue that bans one of the demo's proxies.

Each site runs in threads of the demo process and listens on a loopback address only
(the demo serves two: the shop on 127.0.0.1, the outlet on a second address).  It knows
which proxy delivered a request by the label the demo proxies add (`X-Demo-Via`), or
else by the loopback address the proxy connected from; it answers 403 to the banned
one (what a real site does to a burnt IP) and counts the requests each proxy
delivered.  It also counts requests that carried `Proxy-Authorization`, which would
be a credential leak.
"""

from __future__ import annotations

import html
import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import VIA_HEADER

_PAGE = re.compile(r"^/page/(\d+)$")
_PRODUCTS = ("lamp", "kettle", "chair", "desk", "mug", "clock", "shelf", "rug")


def product(i: int) -> dict[str, Any]:
    """The catalogue entry behind page `i` (deterministic, so tests can check items)."""
    name = f"{_PRODUCTS[i % len(_PRODUCTS)]} #{i}"
    return {"id": i, "name": name, "price": round(9.5 + (i * 7.25) % 90, 2)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # crawls open bursts of connections

    def __init__(self, site: DemoSite, host: str, port: int) -> None:
        self.site = site
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the demo prints its own progress."""

    def do_GET(self) -> None:
        site = self.server.site
        # Which proxy delivered it: its label, else the address it connected from.
        peer = self.headers.get(VIA_HEADER) or self.client_address[0]
        site._record(peer, self.headers.get("Proxy-Authorization") is not None)
        if peer in site.banned_ips:
            self._send(403, "text/plain", b"banned: too many requests from your address\n")
            return
        if site.delay_ms:
            time.sleep(random.uniform(0, site.delay_ms) / 1000.0)
        parts = urlsplit(self.path)
        match = _PAGE.match(parts.path)
        if parts.path == "/":
            self._send(200, "text/html", site.index_html().encode())
        elif match and 1 <= int(match.group(1)) <= site.pages:
            self._send(200, "text/html", site.page_html(int(match.group(1))).encode())
        elif parts.path == "/api/items":
            try:
                page = int(parse_qs(parts.query).get("page", ["1"])[0])
            except ValueError:
                page = 0
            if not 1 <= page <= site.pages:
                self._send(404, "application/json", b'{"error": "no such page"}')
                return
            body = json.dumps({"page": page, "item": product(page)}).encode()
            self._send(200, "application/json", body)
        else:
            self._send(404, "text/plain", b"not found\n")

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", f"{ctype}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:  # asked to (the demo proxies do): say so, as HTTP/1.1 wants
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class DemoSite:
    """A local catalogue of `pages` product pages, an index and a JSON API.

    `banned_ips` get 403 on every path.  `hits` counts requests per peer address;
    `proxy_auth_seen` counts requests that carried `Proxy-Authorization` (must stay 0).
    `host` is the loopback address (or ``localhost``) it listens on and its URL names;
    `title` heads its pages.
    """

    def __init__(
        self,
        pages: int = 24,
        banned_ips: set[str] | None = None,
        delay_ms: float = 20.0,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        title: str = "Demo shop",
    ) -> None:
        self.pages = pages
        self.port = port
        self.host = host
        self.title = title
        self.banned_ips: set[str] = set(banned_ips or ())
        self.delay_ms = delay_ms
        self.hits: Counter[str] = Counter()
        self.proxy_auth_seen = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the demo site is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> DemoSite:
        self._server = _Server(self, self.host, self.port)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"demo-site-{self.host}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _record(self, peer: str, proxy_auth: bool) -> None:
        with self._lock:
            self.hits[peer] += 1
            self.proxy_auth_seen += proxy_auth

    def index_html(self) -> str:
        links = "\n".join(
            f'<li><a href="/page/{i}">{html.escape(product(i)["name"])}</a></li>' for i in range(1, self.pages + 1)
        )
        title = html.escape(self.title)
        return f"<!doctype html><title>{title}</title><h1>{title}</h1><ul>{links}</ul>"

    def page_html(self, i: int) -> str:
        item = product(i)
        return (
            f"<!doctype html><title>{html.escape(item['name'])}</title>"
            f'<h1 class="name">{html.escape(item["name"])}</h1>'
            f'<p class="price">{item["price"]:.2f}</p><a href="/">back</a>'
        )

    def __enter__(self) -> DemoSite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
