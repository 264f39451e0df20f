"""requests door: `PharoxAdapter`, a transport adapter that leases a proxy per request.

```python
session = requests.Session()
adapter = PharoxAdapter(broker)
session.mount("http://", adapter)
session.mount("https://", adapter)
# or: session = pharox_session(broker)
```

Each `send()` leases a proxy from the broker, lets requests' own proxy machinery
(urllib3 `ProxyManager` / `SOCKSProxyManager`, CONNECT, credentials from the URL) carry
the request, reports the outcome to the broker and releases the lease.

Which proxy a request uses, in order of precedence:

1. An explicit proxy for the request's URL, from `proxies=` on the call or
   `session.proxies`, bypasses leasing: the caller chose the proxy.
2. A host matched by `NO_PROXY` (environment, when `trust_env`) or by a `no_proxy`
   key in `proxies` goes out directly, unproxied.
3. Otherwise a leased proxy.  Environment proxies (`HTTP(S)_PROXY`, `ALL_PROXY`)
   never override it: `Session` merges them into `proxies` before the adapter sees
   them, so a proxy equal to what `requests.utils.get_environ_proxies` gives for
   the URL counts as the environment's, not the caller's (passing exactly the
   environment's proxy explicitly is therefore indistinguishable, and leases).

Life of a lease: with `stream=False` the body is read inside `send()` and the lease
released before it returns.  With `stream=True` the lease is held until the body has
been read to the end or the response is closed (`r.close()`, a `with` block); a
response dropped without closing is released when it is garbage-collected.
`adapter.close()` (and so `session.close()`) releases every lease still held.

A response that went through a leased proxy carries `response.pharox_proxy`, the
proxy's URL without credentials (safe to log).

The request's life cycle is the core's `Exchange` (the same in every door): a ban or a
proxy failure moves the request to another proxy, up to `max_moves` times (default:
the broker's); target-side errors are left to requests' `max_retries`.  When every
proxy tried bans the caller gets the last ban response; when every one fails, an
`AllProxiesFailedError` (a `requests.ConnectionError`) naming each proxy's outcome.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import sys
import threading
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import requests
from pharox import ProxyFilters
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, DEFAULT_RETRIES, HTTPAdapter
from requests.exceptions import ContentDecodingError, RequestException
from requests.models import PreparedRequest, Response
from requests.utils import get_environ_proxies, select_proxy, should_bypass_proxies
from urllib3.util.retry import Retry

from .broker import LeaseBroker
from .errors import AllProxiesFailed, NoProxyAvailable, ProxyAuthenticationFailed, ReportFailed
from .exchange import DoorErrors, Step, causes, moves_keyword
from .health import Verdict
from .routes import CLOSER, Route, RouteCache
from .urllib3_support import OpenExchanges, connect_timeout, leased_protocols, socks_hint

__all__ = [
    "AllProxiesFailedError",
    "NoProxyAvailableError",
    "PharoxAdapter",
    "ProxyAuthenticationError",
    "pharox_session",
]

logger = logging.getLogger("pharox_integrations.requests")

_TUNNEL_STATUS = re.compile(r"Tunnel connection failed: (\d{3})")
# Only POSIX reads NO_PROXY from the environment alone; elsewhere requests asks the OS.
_ENV_ONLY_BYPASS = sys.platform != "darwin" and os.name != "nt"


# ---------------------------------------------------------------------- errors


class NoProxyAvailableError(NoProxyAvailable, requests.ConnectionError):
    """The pool had no proxy to lease before the acquire timeout (names the pool and why)."""


class AllProxiesFailedError(AllProxiesFailed, requests.ConnectionError):
    """Every proxy tried for the request was banned or failed; lists each, no secret."""


class ProxyAuthenticationError(AllProxiesFailedError, ProxyAuthenticationFailed, requests.exceptions.ProxyError):
    """The last proxy tried refused our credentials (407 on CONNECT, SOCKS5 auth)."""


class ReportFailedError(ReportFailed, RequestException):
    """Judging or recording an outcome failed (ban detector, storage); the lease went back."""


_ERRORS = DoorErrors(
    no_proxy=NoProxyAvailableError,
    all_failed=AllProxiesFailedError,
    auth_failed=ProxyAuthenticationError,
    report_failed=ReportFailedError,
)


# ---------------------------------------------------------------------- adapter


class PharoxAdapter(HTTPAdapter):
    """A `requests` transport adapter that sends each request through a leased proxy.

    `broker` is a `LeaseBroker`; `pool` and `filters` override the broker's defaults;
    `session` keeps one proxy for every request of this adapter while it stays healthy
    (a logged-in account); `max_moves` is how many other proxies a banned or failed
    request may move to (default: the broker's; `proxy_retries` is its old name);
    `trust_env=False` ignores `NO_PROXY` from the environment (a `no_proxy` key in
    `proxies` is always honoured).  Other keyword arguments are `HTTPAdapter`'s;
    `pool_connections` also bounds how many per-proxy connection pools are kept
    (least recently used first out), so rotating over 10,000 proxies keeps at most
    that many open.  Thread-safe: one adapter may serve many threads.
    """

    def __init__(
        self,
        broker: LeaseBroker,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        session: str | None = None,
        max_moves: int | None = None,
        proxy_retries: int | None = None,
        trust_env: bool = True,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        max_retries: int | Retry = DEFAULT_RETRIES,
        pool_block: bool = DEFAULT_POOLBLOCK,
    ) -> None:
        if pool_connections < 1:
            raise ValueError(f"pool_connections={pool_connections!r}: expected an integer >= 1")
        self.broker = broker
        self.pool = pool
        self.filters = filters
        self.session = session
        self.max_moves = moves_keyword(max_moves, proxy_retries=proxy_retries)
        self.trust_env = trust_env
        self._protocols = leased_protocols()
        self._exchanges = OpenExchanges(defer_close=True)
        self._local = threading.local()
        super().__init__(pool_connections, pool_maxsize, max_retries, pool_block)
        CLOSER.start()

    def __repr__(self) -> str:
        return f"<PharoxAdapter pool={self.pool or self.broker.pool!r} held={self.held}>"

    @property
    def held(self) -> int:
        """Leases this adapter holds right now (in-flight requests and open streams)."""
        return len(self._exchanges)

    # ------------------------------------------------------------------ connection pools

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = DEFAULT_POOLBLOCK, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kw)
        self._pool_args = (connections, maxsize, block)
        # requests' own cache is a plain dict that grows by one manager per proxy
        # forever; ours is bounded by `pool_connections`, and `proxy_manager` reads it.
        self._managers: RouteCache[str, Any] = RouteCache(max(1, connections), setting="pool_connections")
        self.proxy_manager = self._managers

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """requests' per-proxy manager, from a bounded LRU (`RouteCache`).

        The manager is in use until the `send()` that asked for it returns: evicted
        meanwhile, it is `clear()`ed only then (on the closer thread).  A response
        still streaming from one of its connections keeps reading; that connection is
        closed when released.
        """
        route, stale = self._managers.checkout(proxy, lambda: self._build_manager(proxy, **proxy_kwargs))
        for manager in stale:
            CLOSER.put(manager.clear)
        held: list[Route[str, Any]] | None = getattr(self._local, "routes", None)
        if held is None:  # called outside send(): nothing keeps it in use
            self._checkin(route)
        else:
            held.append(route)
        return route.value

    def _build_manager(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """requests' own construction (SOCKS or HTTP, `proxy_headers`), into a scratch cache."""
        connections, maxsize, block = self._pool_args
        scratch = SimpleNamespace(
            proxy_manager={},
            proxy_headers=self.proxy_headers,
            _pool_connections=connections,
            _pool_maxsize=maxsize,
            _pool_block=block,
        )
        return HTTPAdapter.proxy_manager_for(scratch, proxy, **proxy_kwargs)  # type: ignore[arg-type]

    def _send_holding(self, request: PreparedRequest, **kwargs: Any) -> Response:
        """`HTTPAdapter.send`, with the proxy manager it picks in use until it returns."""
        held: list[Route[str, Any]] = []
        self._local.routes = held
        try:
            return super().send(request, **kwargs)
        finally:
            self._local.routes = None
            for route in held:
                self._checkin(route)

    def _checkin(self, route: Route[str, Any]) -> None:
        idle = self._managers.checkin(route)
        if idle is not None:
            CLOSER.put(idle.clear)  # evicted earlier, idle only now

    # ------------------------------------------------------------------ send

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        """Send `request` through a leased proxy (see the module docstring for precedence)."""
        url = request.url or ""
        kwargs: dict[str, Any] = {"stream": stream, "timeout": timeout, "verify": verify, "cert": cert}
        if self._explicit_proxy(url, proxies) is not None:
            return self._send_holding(request, proxies=dict(proxies or {}), **kwargs)
        if self._bypassed(url, proxies):
            return self._send_holding(request, proxies={}, **kwargs)
        return self._send_leased(request, url, **kwargs)

    def _explicit_proxy(self, url: str, proxies: Mapping[str, str] | None) -> str | None:
        """The caller's own proxy for `url`, or None (none given, or the environment's)."""
        if not proxies:
            return None
        chosen = select_proxy(url, dict(proxies))
        if not chosen:
            return None
        environ = get_environ_proxies(url, no_proxy=proxies.get("no_proxy"))
        if environ and select_proxy(url, environ) == chosen:
            return None
        return chosen

    def _bypassed(self, url: str, proxies: Mapping[str, str] | None) -> bool:
        """True when `NO_PROXY` (or a `no_proxy` key in `proxies`) covers the URL's host."""
        no_proxy = proxies.get("no_proxy") if proxies else None
        if not self.trust_env:
            return bool(no_proxy) and should_bypass_proxies(url, no_proxy=no_proxy)
        # should_bypass_proxies costs ~50 µs; on POSIX it can only say yes with a list.
        if no_proxy is None and _ENV_ONLY_BYPASS and not (os.environ.get("no_proxy") or os.environ.get("NO_PROXY")):
            return False
        return should_bypass_proxies(url, no_proxy=no_proxy)

    def _send_leased(self, request: PreparedRequest, url: str, *, stream: bool, **kwargs: Any) -> Response:
        if "Proxy-Authorization" in request.headers:
            # Meant for another proxy (Session adds it from environment proxies on
            # redirects): through a tunnel or SOCKS it would reach the target.
            request = request.copy()
            del request.headers["Proxy-Authorization"]
        exchange = self._exchanges.add(
            self.broker.exchange(
                url,
                pool=self.pool,
                filters=self.filters,
                session=self.session,
                protocols=self._protocols,
                max_moves=self.max_moves,
                body=request.body,
                timeout=connect_timeout(kwargs.get("timeout")),
                errors=_ERRORS,
            )
        )
        try:
            try:
                lease = exchange.lease()
            except NoProxyAvailable as exc:
                raise _for_request(socks_hint(exc, self._protocols), request) from None
            while True:
                response: Response | None = None
                try:
                    proxies = {"http": lease.url, "https": lease.url}
                    response = self._send_holding(request, stream=stream, proxies=proxies, **kwargs)
                    if not stream:
                        response.content  # noqa: B018  # read here, so body errors can move the request
                except Exception as exc:
                    if response is not None:
                        response.close()
                    verdict, status = _door_verdict(exc)
                    step = exchange.failed(exc, status_code=status, verdict=verdict)
                    if step is Step.RAISE:
                        raise _for_request(exchange.error, request) from exc
                    if step is Step.MOVE:
                        lease = exchange.lease()
                    continue
                response.pharox_proxy = lease.safe_url  # type: ignore[attr-defined]
                try:
                    step = exchange.answered(response.status_code, response, streaming=stream)
                except BaseException:
                    response.close()  # its connection goes back to the pool too
                    raise
                if step is Step.RETURN:
                    if stream and response.raw is not None:
                        # Released when the body is read to the end or the response closed.
                        self._exchanges.stream(exchange, response.raw)
                    return response
                response.close()
                if step is Step.RAISE:
                    raise _for_request(exchange.error, request)
                lease = exchange.lease()
        finally:
            self._exchanges.end_unless_streaming(exchange)  # nothing else stays leased, whatever the way out

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Release the leases still held by this adapter and close every connection pool.

        Safe to call twice (`Session.close()` calls it once per mounted prefix).
        """
        if streams := self._exchanges.end_streams():
            logger.info("released %(n)d lease(s) still held at adapter close", {"n": streams})
        self.poolmanager.clear()
        for manager in self._managers.drain():
            manager.clear()


# ---------------------------------------------------------------------- helpers


def _door_verdict(exc: BaseException) -> tuple[Verdict | None, int | None]:
    """What this door knows better than the generic policy about a requests error.

    Returns (verdict or None to let the policy judge, status code of a refused CONNECT).
    requests' caller errors (InvalidURL, InvalidHeader...) are ValueErrors *and*
    OSErrors; a bad target certificate or body encoding is the target's doing.
    """
    if isinstance(exc, (ValueError, ContentDecodingError)):
        return Verdict.TARGET_ERROR, None
    for cause in causes(exc):
        match = _TUNNEL_STATUS.search(str(cause)) if isinstance(cause, OSError) else None
        if match:
            return None, int(match.group(1))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return Verdict.TARGET_ERROR, None
    return None, None


def _for_request(error: BaseException | None, request: PreparedRequest) -> BaseException:
    """The exchange's final error, carrying the request as requests' own errors do."""
    assert error is not None
    if isinstance(error, RequestException) and getattr(error, "request", None) is None:
        error.request = request
    return error


def pharox_session(broker: LeaseBroker, **adapter_kwargs: Any) -> requests.Session:
    """A `requests.Session` with a `PharoxAdapter(broker, **adapter_kwargs)` on http:// and https://."""
    session = requests.Session()
    adapter = PharoxAdapter(broker, **adapter_kwargs)  # session=, max_moves=, pool=, filters=...
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
