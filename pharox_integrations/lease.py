"""What a door holds while a request is in flight: the leased proxy, its URLs, its secrets kept out of sight."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from pharox import Lease, Proxy, ProxyProtocol, ProxyStatus

from .health import Verdict
from .settings import ProxySpec


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """What clients need of a proxy, computed once per proxy id.

    Slotted: a broker keeps one per proxy it has leased for as long as it runs, and
    every long-lived container is walked by the garbage collector's full passes.
    """

    url: str = field(repr=False)  # with percent-encoded credentials
    safe_url: str
    protocol: ProxyProtocol
    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)

    @classmethod
    def of(cls, proxy: Proxy) -> _Endpoint:
        spec = ProxySpec.from_proxy(proxy)
        return cls(
            url=spec.url,
            safe_url=spec.safe_url,
            protocol=spec.protocol,
            host=spec.host,
            port=spec.port,
            username=spec.username,
            password=spec.password,
        )


class LeaseHandle(Protocol):
    """What a storage's one-step `acquire_lease` may hand out instead of a pharox `Lease`
    (the memory storage's own record): given back to its `release_lease` as it is."""

    proxy_id: UUID

    def to_lease(self) -> Lease: ...


class ProxyLease:
    """One leased proxy for one request.  `repr`/`str` never show credentials."""

    __slots__ = (
        "_endpoint",
        "_handle",
        "_lease",
        "_state",
        "polite",
        "pool",
        "proxy_id",
        "released",
        "reported",
        "session",
        "site",
        "started",
        "verdict",
    )

    def __init__(
        self,
        lease: Lease | LeaseHandle,
        endpoint: _Endpoint,
        pool: str,
        session: str | None,
        site: str | None = None,
    ) -> None:
        self._handle = lease
        self._lease = lease if isinstance(lease, Lease) else None
        self.proxy_id: UUID = lease.proxy_id
        self._endpoint = endpoint
        self.pool = pool
        self.session = session
        self.site = site  # the request's site: a ban or cool-down holds the pair (proxy, site)
        self.polite = False  # it claimed the pair's visit slot (site_delay)
        self.started = time.monotonic()
        self.released = False
        self.reported = False
        self.verdict: Verdict | None = None
        self._state: Any = None  # the broker's health record of this proxy, set when leased

    @property
    def lease(self) -> Lease:
        """The pharox `Lease` (built on first use when the storage handed out its own record)."""
        if self._lease is None:
            self._lease = self._handle.to_lease()  # type: ignore[union-attr]
        return self._lease

    @property
    def acquired_at(self) -> datetime:
        return self.lease.acquired_at

    @property
    def url(self) -> str:
        """Proxy URL with percent-encoded credentials, for the client only: never log it."""
        return self._endpoint.url

    @property
    def safe_url(self) -> str:
        """Proxy URL without credentials: safe for logs, stats and `response.meta`."""
        return self._endpoint.safe_url

    @property
    def protocol(self) -> ProxyProtocol:
        return self._endpoint.protocol

    @property
    def host(self) -> str:
        return self._endpoint.host

    @property
    def port(self) -> int:
        return self._endpoint.port

    @property
    def username(self) -> str | None:
        return self._endpoint.username

    @property
    def password(self) -> str | None:
        return self._endpoint.password

    @property
    def proxy_authorization(self) -> str | None:
        """`Proxy-Authorization` header value for HTTP proxies, or None without credentials."""
        if self._endpoint.username is None:
            return None
        raw = f"{self._endpoint.username}:{self._endpoint.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<ProxyLease {self.safe_url} pool={self.pool!r} {state}>"

    __str__ = __repr__


class ProxyView:
    """A read-only view of a stored proxy, as `broker.proxies()` returns it.

    Every field of pharox's `Proxy` reads through (`.port`, `.status`, `.current_leases`,
    `.credentials` ...), but `repr`/`str` never show credentials: pharox's model prints
    `password='…'` in its repr, and proxies end up in logs, test failures and REPLs.
    `to_pharox()` gives pharox's model (a copy) where pharox's own API wants one.
    """

    __slots__ = ("_proxy",)

    def __init__(self, proxy: Proxy) -> None:
        object.__setattr__(self, "_proxy", proxy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proxy, name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ProxyView is read-only: change proxies through the broker, not {name!r}")

    @property
    def id(self) -> UUID:
        return self._proxy.id  # type: ignore[no-any-return]

    @property
    def host(self) -> str:
        return str(self._proxy.host)

    @property
    def port(self) -> int:
        return int(self._proxy.port)

    @property
    def protocol(self) -> ProxyProtocol:
        return ProxyProtocol(self._proxy.protocol)

    @property
    def status(self) -> ProxyStatus:
        return ProxyStatus(self._proxy.status)

    @property
    def current_leases(self) -> int:
        return int(self._proxy.current_leases)

    @property
    def max_concurrency(self) -> int | None:
        return self._proxy.max_concurrency  # type: ignore[no-any-return]

    @property
    def safe_url(self) -> str:
        """The proxy's URL without credentials."""
        return ProxySpec.from_proxy(self._proxy).safe_url

    def to_pharox(self) -> Proxy:
        copy: Proxy = self._proxy.model_copy()
        return copy

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProxyView) and other._proxy == self._proxy

    def __hash__(self) -> int:
        return hash(self._proxy.id)

    def __repr__(self) -> str:
        limit = "unlimited" if self.max_concurrency is None else str(self.max_concurrency)
        return f"<Proxy {self.safe_url} {self.status.value} leases={self.current_leases}/{limit} id={self.id}>"

    __str__ = __repr__


@dataclass(frozen=True)
class PoolHealth:
    """A snapshot of one pool for stats pages and log lines."""

    pool: str
    total: int
    active: int
    banned: int
    inactive: int
    slow: int
    leased: int
    held_here: int
    requests: int
    success_rate: float | None
    median_latency_ms: float | None
    # With `health(site=...)`: the site's standing of the pool's active proxies.
    site: str | None = None
    site_banned: int = 0  # banned by that site (still in their cool-down there)
    site_cooling: int = 0  # cooling for that site (Retry-After, politeness spacing)
    site_usable: int | None = None  # active and not held off that site

    def __str__(self) -> str:
        rate = "-" if self.success_rate is None else f"{self.success_rate:.0%}"
        lat = "-" if self.median_latency_ms is None else f"{self.median_latency_ms:.0f} ms"
        text = (
            f"pool {self.pool!r}: {self.active}/{self.total} active, {self.banned} banned, "
            f"{self.inactive} inactive, {self.slow} slow, {self.leased} leased; "
            f"success {rate}, median latency {lat}"
        )
        if self.site is not None:
            text += (
                f"; site {self.site!r}: {self.site_usable} usable, {self.site_banned} banned there, "
                f"{self.site_cooling} cooling"
            )
        return text
