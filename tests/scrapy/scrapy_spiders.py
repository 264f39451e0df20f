"""Spiders and checks shared by the Scrapy door tests."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import quote

from scrapy import Request, Spider
from scrapy.http import Response
from servers import SPECIAL_AUTH
from twisted.python.failure import Failure


class Pages(Spider):
    """Walks the target's binary tree of linked pages `/page/<i>?n=<n>`."""

    name = "pages"

    def __init__(self, base: str, n: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base
        self.n = n
        self.items: list[dict[str, Any]] = []
        self.errors: list[Failure] = []

    async def start(self) -> AsyncIterator[Request]:
        yield Request(f"{self.base}/page/0?n={self.n}", errback=self.failed)

    def parse(self, response: Response) -> Iterator[Any]:
        self.items.append({"url": response.url, "proxy": response.meta.get("pharox_proxy")})
        for href in response.css("a::attr(href)").getall():
            yield response.follow(href, errback=self.failed)

    def failed(self, failure: Failure) -> None:
        self.errors.append(failure)


class Urls(Spider):
    """Fetches given (url, meta) pairs; keeps every response and every failure."""

    name = "urls"

    def __init__(self, requests: Iterable[tuple[str, dict[str, Any]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.to_fetch = list(requests)
        self.responses: list[Response] = []
        self.errors: list[Failure] = []

    async def start(self) -> AsyncIterator[Request]:
        for url, meta in self.to_fetch:
            yield Request(url, meta=dict(meta), dont_filter=True, errback=self.failed)

    def parse(self, response: Response) -> None:
        self.responses.append(response)

    def failed(self, failure: Failure) -> None:
        self.errors.append(failure)


def echo(response: Response) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.text)
    return data


def secrets() -> list[str]:
    """Every form the kit's special credentials could leak in."""
    user, password = SPECIAL_AUTH
    forms = [password, quote(password, safe=""), quote(password), base64.b64encode(password.encode()).decode()]
    for suffix in ("", "1", "2", "3"):
        token = base64.b64encode(f"{user}{suffix}:{password}{suffix}".encode()).decode()
        forms += [token, f"{password}{suffix}", quote(f"{password}{suffix}", safe="")]
    return forms


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        shown = str(text)
        for secret in secrets():
            if secret in shown:
                at = shown.find(secret)
                context = shown[max(0, at - 60) : at + len(secret) + 40].replace(secret, "<SECRET>")
                raise AssertionError(f"a credential leaked: …{context}…")


def assert_auth_only_to_its_proxy(target: Any, proxies: Iterable[Any]) -> None:
    """Proxy-Authorization at the target may only be the carrying proxy's own.

    proxy.py 2.4 handles only the first request of a keep-alive client connection;
    later ones go upstream as they came, Proxy-Authorization included (and without
    an auth check).  So for plain HTTP the target can see a header; what must hold is
    that it is never another proxy's credentials (a stale header after a move).
    """
    own = {p.outbound_ip: p.proxy_headers.get("Proxy-Authorization") for p in proxies}
    for seen in target.requests:
        sent = {k.lower(): v for k, v in seen.headers.items()}.get("proxy-authorization")
        if sent is not None:
            assert seen.peer_ip in own and sent == own[seen.peer_ip], f"foreign credentials via {seen.peer_ip}"
