"""urllib3 door: `PharoxProxyManager`, a `urllib3.ProxyManager` that leases a proxy per request.

Code that holds ``urllib3.ProxyManager("http://proxy:3128")`` switches to
``PharoxProxyManager(broker)`` and nothing else changes::

    broker = LeaseBroker.from_proxies(["http://user:pass@10.0.0.1:3128", "socks5://10.0.0.2:1080"])
    with PharoxProxyManager(broker, headers={"User-Agent": "shop-bot"}) as http:
        r = http.request("GET", "https://example.com/")

How it is built: each hop of a request is sent as `ProxyManager.urlopen` sends it (the
absolute URL and `Accept`/`Host` to a forwarding proxy, the path through a tunnel or
SOCKS), through the pools urllib3's own `_merge_pool_kwargs` and `_new_pool` build with
the leased proxy's pool arguments (`_proxy`, `_proxy_headers`, `_proxy_config`, or
`_socks_options` for a SOCKS proxy), and the pool's own `urlopen`.

Pools are kept in a `RouteCache` (routes.py, shared by every door) under this door's
own key (the proxy's URL, plus the target for a tunnel or SOCKS), not through urllib3's
`connection_from_host` and its pool key, because that is what rotation pays for on
every request: urllib3's key normaliser alone costs ~9 µs a request, hit or miss
(``bench_urllib3.py --stub-io``, where no socket hides the client's own CPU).
`num_pools` bounds the pools across all proxies; the cache counts the requests using
each pool, so an evicted pool is closed once no request uses it (closing it between
"get a pool" and "get a connection" fails that request, urllib3 issue #1252; a
response still streaming keeps its connection either way).  Closing evicted pools is
about half of what rotating over 10,000 proxies costs here beyond the plain rotation
of ``bench_urllib3.py``, which never closes any.

The request's life cycle is the core's `Exchange`, the same in every door: a ban or a
proxy failure (refused connection, failed tunnel, 407) moves the request to another
proxy, up to `max_moves` times (default: the broker's).  When every proxy tried bans,
the caller gets the last ban response; when every one fails, `AllProxiesFailedError`
(a `MaxRetryError`) names each proxy once.  Target-side errors and urllib3's `Retry`
stay urllib3's business.

Redirects follow urllib3's `PoolManager` rules (303 turns into GET without a body,
unsafe headers dropped across hosts, `Retry` counts them), and every hop leases,
reports and releases its own proxy.  The door walks the chain itself rather than
through `PoolManager.urlopen`'s redirect tail: that tail calls `urlopen` again while
the first hop's proxy is still held and unjudged (a pool of one proxy would wait for
itself, and a redirect to a ban page could not move), and sends the first hop's `Host`
to the next host.
"""

from __future__ import annotations

import ssl
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, NoReturn
from urllib.parse import urljoin

import urllib3
from pharox import ProxyFilters, ProxyProtocol
from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPHeaderDict, Retry
from urllib3.connection import ProxyConfig
from urllib3.connectionpool import port_by_scheme
from urllib3.exceptions import HTTPError, LocationValueError, MaxRetryError, ProxyError, URLSchemeUnknown
from urllib3.util import Url, parse_url
from urllib3.util.proxy import connection_requires_http_tunnel

from .broker import LeaseBroker, ProxyLease
from .errors import AllProxiesFailed, NoProxyAvailable, PharoxIntegrationError, ProxyAuthenticationFailed, ReportFailed
from .exchange import DoorErrors, Exchange, Step, describe_error, moves_keyword
from .health import Verdict
from .routes import CLOSER, Route, RouteCache
from .urllib3_support import OpenExchanges, connect_timeout, leased_protocols, socks_hint

__all__ = [
    "AllProxiesFailedError", "LeaseFailedError", "NoProxyAvailableError", "PharoxProxyManager", "PharoxUrllib3Error",
    "ProxyAuthenticationFailedError", "ProxyNotLeasedError", "ReportFailedError",
]

_SOCKS_VERSIONS = {ProxyProtocol.SOCKS4: 1, ProxyProtocol.SOCKS5: 2}  # PySocks' PROXY_TYPE_SOCKS4 / 5
_PoolKey = tuple[Any, ...]


# ---------------------------------------------------------------------------- errors


class PharoxUrllib3Error(PharoxIntegrationError, HTTPError):
    """Base of this door's own errors: caught by ``except urllib3.exceptions.HTTPError``."""


class NoProxyAvailableError(NoProxyAvailable, PharoxUrllib3Error):
    """No proxy could be leased in time; the message names the pool and why."""


class LeaseFailedError(PharoxUrllib3Error):
    """The broker could not lease a proxy (storage down, broker closed)."""


class ProxyNotLeasedError(PharoxUrllib3Error):
    """`connection_from_*` was called with no proxy leased on this thread."""


class ReportFailedError(ReportFailed, PharoxUrllib3Error):
    """Judging or recording a request's outcome failed (a ban detector raised, the storage
    failed); the proxy and the connection went back.  `__cause__` is the original error."""


class AllProxiesFailedError(AllProxiesFailed, MaxRetryError):
    """Every proxy tried for the request failed; names each proxy once, no secret.

    A `MaxRetryError`, as plain urllib3 raises when its one proxy fails, so
    ``except MaxRetryError`` keeps working: `url` is the request's URL and `reason`
    the last underlying error (None when the last proxy answered, such as a 407).
    """

    def _init_base(self, message: str) -> None:  # not MaxRetryError's (pool, url, reason): set by `_raise`
        Exception.__init__(self, message)
        self.pool, self.url, self.reason = None, None, None  # type: ignore[assignment]


class ProxyAuthenticationFailedError(AllProxiesFailedError, ProxyAuthenticationFailed, ProxyError):
    """The last proxy tried refused our credentials (a 407 answer, a refused CONNECT, SOCKS5
    authentication): also a urllib3 `ProxyError`."""


_ERRORS = DoorErrors(
    no_proxy=NoProxyAvailableError, all_failed=AllProxiesFailedError,
    auth_failed=ProxyAuthenticationFailedError, report_failed=ReportFailedError,
)


def _raise(ex: Exchange, url: str, cause: BaseException | None) -> NoReturn:
    """Raise the error the core chose on Step.RAISE, with urllib3's `MaxRetryError` fields
    set (`cause`: the send's error, None when the last proxy answered)."""
    error = ex.error
    assert error is not None, "the core sets the error with Step.RAISE"
    if isinstance(error, AllProxiesFailedError):
        reason = cause.reason if isinstance(cause, MaxRetryError) else cause
        error.url, error.reason = url, reason if isinstance(reason, Exception) else None
        if isinstance(error, ProxyError) and error.reason is not None:
            error.original_error = error.reason
    if cause is None or error is cause:  # `cause` itself: the caller's or the site's doing
        raise error
    raise error from cause


def _verdict_for(error: Exception) -> Verdict | None:
    """urllib3 errors that say nothing against the proxy (None: the policy decides).

    - `ResponseError` (inside `MaxRetryError`): the target answered too many
      retryable statuses; the proxy delivered every one of them.
    - `SSLError` that is not a `ProxyError`: the target's TLS handshake failed at the
      end of a working tunnel (bad certificate, wrong CA bundle).  urllib3 wraps a
      failed TLS handshake with the proxy itself in `ProxyError`.
    """
    reason = error.reason if isinstance(error, MaxRetryError) else error
    target_tls = isinstance(reason, urllib3.exceptions.SSLError) and not isinstance(reason, ProxyError)
    return Verdict.TARGET_ERROR if target_tls or isinstance(reason, urllib3.exceptions.ResponseError) else None


def _request_form(pool: HTTPConnectionPool, target: Url, send: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(URL, `urlopen` arguments) of a request as `ProxyManager.urlopen` sends it: to a
    forwarding proxy the absolute URL (no fragment) with the `Accept` and `Host` its
    `_set_proxy_headers` adds (written out: that hook parses the URL again, ~4 us a
    request); through a tunnel or SOCKS the path."""
    if pool.proxy is None or connection_requires_http_tunnel(pool.proxy, pool.proxy_config, target.scheme):
        return target.request_uri, send
    headers = {"Accept": "*/*", **({"Host": target.netloc} if target.netloc else {}), **send["headers"]}
    return target._replace(fragment=None).url, {**send, "headers": headers}


# ---------------------------------------------------------------------------- responses


def _discard(response: BaseHTTPResponse) -> None:
    """Close an answer nobody will read and give its connection's slot back to the pool
    (`close()` alone leaves the slot checked out: a blocking pool would run dry)."""
    response.close()
    response.release_conn()


# ---------------------------------------------------------------------------- hops


class _Hop:
    """One proxy carrying a hop of a request (or a `leased()` block) on this thread, and
    the pools it took: in use, so never closed under it, until the hop ends."""

    __slots__ = ("lease", "manager", "routes")

    def __init__(self, manager: PharoxProxyManager, lease: ProxyLease) -> None:
        self.manager, self.lease = manager, lease
        self.routes: list[Route[_PoolKey, HTTPConnectionPool]] = []

    def __enter__(self) -> _Hop:
        self.manager._local.hops.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.manager._local.hops.remove(self)
        for route in self.routes:
            idle = self.manager._routes.checkin(route)
            if idle is not None:  # evicted while this hop used it
                CLOSER.put(idle.close)


class _Pools(RouteCache[_PoolKey, HTTPConnectionPool]):
    """The door's pools, also shown the way urllib3's `RecentlyUsedContainer` shows them
    (`_container`, least recently used first): code written for `ProxyManager.pools`,
    urllib3's own proxy tests included, reads that."""

    @property
    def _container(self) -> dict[_PoolKey, HTTPConnectionPool]:
        return dict(self.items())


class _Hops(threading.local):
    def __init__(self) -> None:
        self.hops: list[_Hop] = []  # innermost last: a request inside a `leased()` block


# ---------------------------------------------------------------------------- manager


class PharoxProxyManager(urllib3.ProxyManager):
    """A drop-in `urllib3.ProxyManager` that leases a proxy from `broker` for each request.

    Takes the arguments of `urllib3.ProxyManager`, with `broker` in place of the proxy
    URL, plus:

    - `max_moves`: how many other proxies a request the site refuses (a 403 ban, a 429
      cool-down by default) or its proxy fails may move to (default: the broker's,
      `PHAROX_MAX_MOVES`);
      `proxy_retries` is its old name.  A body that cannot be sent again (a generator,
      a non-seekable stream) never moves; a seekable one is rewound.
    - `pool`, `filters`, `session`: what to lease (defaults: the broker's).

    With ``preload_content=False`` the lease is held until the body is read to the
    end, or `release_conn()`, `drain_conn()` or `close()` is called; otherwise it is
    released before `request()` returns.  `clear()` (and leaving a ``with`` block)
    releases any lease still held by a response.  `proxy` is the proxy leased on this
    thread while a request (or a `leased()` block) is in progress, None otherwise.
    """

    def __init__(  # ProxyManager's arguments, `broker` in place of `proxy_url`
        self, broker: LeaseBroker, num_pools: int = 10, headers: Mapping[str, str] | None = None,
        proxy_headers: Mapping[str, str] | None = None, proxy_ssl_context: ssl.SSLContext | None = None,
        use_forwarding_for_https: bool = False, proxy_assert_hostname: str | Literal[False] | None = None,
        proxy_assert_fingerprint: str | None = None,
        *, max_moves: int | None = None, proxy_retries: int | None = None,  # what to lease, and how often to move
        pool: str | None = None, filters: ProxyFilters | None = None, session: str | None = None,
        **connection_pool_kw: Any,
    ) -> None:
        self.max_moves = moves_keyword(max_moves, proxy_retries=proxy_retries)
        # As ProxyManager.__init__ does, for any HTTPS proxy the broker may lease.
        self.proxy_ssl_context = proxy_ssl_context
        if use_forwarding_for_https and connection_pool_kw.get("ssl_context") is not None:
            warnings.warn(
                "Passing ssl_context when use_forwarding_for_https=True is deprecated and will raise an error in "
                "urllib3 v3.0. Use proxy_ssl_context to configure the TLS connection to the proxy.",
                FutureWarning, stacklevel=2,
            )
            self.proxy_ssl_context = proxy_ssl_context or connection_pool_kw["ssl_context"]
        # Not ProxyManager.__init__: it wants one fixed proxy URL.  The per-proxy
        # arguments it would store in `connection_pool_kw` are added per pool instead.
        urllib3.PoolManager.__init__(self, num_pools, headers, **connection_pool_kw)
        self.pools = self._routes = _Pools(num_pools, setting="num_pools")  # type: ignore[assignment]
        self.proxy_headers = dict(proxy_headers or {})
        self.proxy_config = ProxyConfig(
            proxy_ssl_context, use_forwarding_for_https, proxy_assert_hostname, proxy_assert_fingerprint
        )
        self.broker, self.lease_pool, self.lease_filters, self.lease_session = broker, pool, filters, session
        self.protocols = leased_protocols()
        self._local = _Hops()
        self._exchanges = OpenExchanges(defer_close=False)
        CLOSER.start()

    # ------------------------------------------------------------------ urllib3 surface

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> BaseHTTPResponse:  # type: ignore[override]
        """`urllib3.ProxyManager.urlopen` through leased proxies (``url`` must be absolute)."""
        hop: tuple[str, str, dict[str, Any]] | None = (method, url, kw)
        while hop is not None:
            response, hop = self._exchange(*hop, redirect=redirect)
        return response

    @property
    def proxy(self) -> Url | None:  # type: ignore[override]
        """The HTTP(S) proxy leased on this thread (None outside a request, or for SOCKS)."""
        lease = self.current_lease
        return None if lease is None or lease.protocol in _SOCKS_VERSIONS else parse_url(lease.safe_url)

    def connection_from_host(
        self, host: str | None, port: int | None = None, scheme: str | None = "http",
        pool_kwargs: dict[str, Any] | None = None,
    ) -> HTTPConnectionPool:
        """The pool for `host` through the proxy leased on this thread (see `leased()`).

        Picked as `ProxyManager` picks it: a target reached through the proxy's own
        connection (plain HTTP through an HTTP(S) proxy) shares the proxy's pool.
        """
        if not self._local.hops:
            raise ProxyNotLeasedError(
                "no proxy is leased on this thread: use request()/urlopen(), or call connection_from_* inside "
                "`with manager.leased():`"
            )
        hop = self._local.hops[-1]
        if not host:
            raise LocationValueError("No host specified.")
        scheme = (scheme or "http").lower()
        if scheme not in port_by_scheme:
            raise URLSchemeUnknown(scheme)
        lease = hop.lease
        key: _PoolKey = (lease.url,)  # forwarded: the pool connects to the proxy itself
        if scheme == "https" or lease.protocol in _SOCKS_VERSIONS:
            key = (lease.url, scheme, host.lower(), port or port_by_scheme[scheme])
        if pool_kwargs:
            key += (repr(sorted(pool_kwargs.items())),)
        route, stale = self._routes.checkout(key, partial(self._new_proxy_pool, lease, scheme, host, port, pool_kwargs))
        for evicted in stale:
            CLOSER.put(evicted.close)  # off the request path: closing a socket waits for the proxy
        hop.routes.append(route)
        return route.value

    def connection_from_pool_key(self, pool_key: Any, request_context: dict[str, Any]) -> HTTPConnectionPool:
        """Where urllib3's `connection_from_context` ends: pools are keyed by proxy and target
        here, so `pool_key` is not used; the context says which pool."""
        context = dict(request_context)
        host, port, scheme = context.pop("host", None), context.pop("port", None), context.pop("scheme", "http")
        return self.connection_from_host(host, port, scheme, pool_kwargs=context)

    def clear(self) -> None:
        """Close every pool and release the leases streamed responses still hold.

        Requests in flight on other threads keep their pools until they finish.
        """
        for pool in self._routes.drain(spare_in_use=True):
            pool.close()
        self._exchanges.end_streams()

    # ------------------------------------------------------------------ explicit leases

    @contextmanager
    def leased(self, url: str | None = None) -> Iterator[ProxyLease]:
        """Hold one proxy on this thread for `connection_from_*` (low-level pool use).

        ``with http.leased() as lease: pool = http.connection_from_url(url)``.  Report
        outcomes yourself with ``broker.report(lease, ...)``; the lease is released on
        exit (an escaping exception is reported against the proxy first).
        """
        ex = self._open(url, None, None)
        try:
            lease = self._lease(ex)
            with _Hop(self, lease):
                try:
                    yield lease
                except Exception as exc:
                    if not lease.reported:
                        self.broker.report(lease, error=exc)
                    raise
        finally:
            self._exchanges.end(ex)

    @property
    def current_lease(self) -> ProxyLease | None:
        """The lease carrying this thread's request in progress (or `leased()` block)."""
        hops = self._local.hops
        return hops[-1].lease if hops else None

    @property
    def held(self) -> int:
        """Requests of this manager holding a lease now (in flight, or a streamed body)."""
        return len(self._exchanges)

    def __repr__(self) -> str:
        return f"<PharoxProxyManager pool={self.lease_pool or self.broker.pool!r} pools={len(self.pools)}>"

    # ------------------------------------------------------------------ one hop

    def _exchange(
        self, method: str, url: str, kw: dict[str, Any], redirect: bool
    ) -> tuple[BaseHTTPResponse, tuple[str, str, dict[str, Any]] | None]:
        """Send one hop, moving between proxies as the core says: (answer, next hop or None)."""
        target = parse_url(url)
        if target.scheme is None:  # as urllib3 warns, pointing at the caller of urlopen()
            message = "URLs without a scheme are deprecated in urllib3 and will raise an error in urllib3 v3.0"
            warnings.warn(f"{message}; start the URL with 'http://' or 'https://'", FutureWarning, stacklevel=3)
        send = dict(kw, assert_same_host=False, redirect=False, headers=kw.get("headers", self.headers))
        ex = self._open(url, kw.get("body"), kw.get("timeout", self.connection_pool_kw.get("timeout")))
        try:
            lease = self._lease(ex)
            while True:
                failure: Exception | None = None
                try:
                    with _Hop(self, lease):
                        pool = self.connection_from_host(target.host, target.port, target.scheme)
                        path, options = _request_form(pool, target, send)
                        response = pool.urlopen(method, path, **options)
                except (HTTPError, OSError) as exc:
                    failure = exc
                if failure is not None:
                    # Judged outside the `except`: a report failing there would carry the
                    # send's error as its context and be described as that error.
                    if (step := ex.failed(failure, verdict=_verdict_for(failure))) is Step.RAISE:
                        _raise(ex, url, failure)
                else:
                    try:
                        streaming = not kw.get("preload_content", True) and response.connection is not None
                        step = ex.answered(response.status, response, streaming=streaming)
                    except BaseException:
                        _discard(response)
                        raise
                    if step is Step.RETURN:
                        # Judged first: a redirect followed (or refused) ends the hop here.
                        follow = self._redirect(pool, method, url, response, kw) if redirect else None
                        if follow is None and streaming:
                            self._exchanges.stream(ex, response)
                        return response, follow
                    _discard(response)
                    if step is Step.RAISE:
                        _raise(ex, url, None)
                if step is Step.MOVE:
                    lease = self._lease(ex)
                # Step.RESEND: the same lease again, on a fresh connection
        finally:
            self._exchanges.end_unless_streaming(ex)

    def _open(self, url: str | None, body: Any, timeout: Any) -> Exchange:
        return self._exchanges.add(self.broker.exchange(
            url, pool=self.lease_pool, filters=self.lease_filters, session=self.lease_session, protocols=self.protocols,
            max_moves=self.max_moves, body=body, timeout=connect_timeout(timeout), errors=_ERRORS,
        ))

    def _lease(self, ex: Exchange) -> ProxyLease:
        try:
            return ex.lease()
        except NoProxyAvailableError as exc:
            socks_hint(exc, self.protocols)
            raise
        except Exception as exc:  # the storage failed, the broker is closed: still an HTTPError
            pool = self.lease_pool or self.broker.pool
            raise LeaseFailedError(f"could not lease a proxy from pool {pool!r}: {describe_error(exc)}") from exc

    def _new_proxy_pool(
        self, lease: ProxyLease, scheme: str, host: str, port: int | None, pool_kwargs: dict[str, Any] | None
    ) -> HTTPConnectionPool:
        """A pool through `lease`'s proxy, with the arguments `ProxyManager` (or
        `SOCKSProxyManager`) gives its pools, built by urllib3's `_new_pool`."""
        context = self._merge_pool_kwargs(pool_kwargs)
        port = port or port_by_scheme[scheme]
        if lease.protocol in _SOCKS_VERSIONS:
            context["_socks_options"] = {
                "socks_version": _SOCKS_VERSIONS[lease.protocol], "proxy_host": lease.host, "proxy_port": lease.port,
                "username": lease.username, "password": lease.password, "rdns": False,
            }
            from urllib3.contrib.socks import SOCKSProxyManager  # the socks extra: imported on first use

            # `_new_pool` reads only `pool_classes_by_scheme` of its manager: a class attribute.
            return urllib3.PoolManager._new_pool(SOCKSProxyManager, scheme, host, port, context)  # type: ignore[arg-type]
        proxy = parse_url(lease.safe_url)
        headers = dict(self.proxy_headers)
        if (authorization := lease.proxy_authorization) is not None:
            headers["Proxy-Authorization"] = authorization
        context.update(_proxy=proxy, _proxy_headers=headers, _proxy_config=self.proxy_config)
        if scheme != "https":  # forwarded: to the proxy, as ProxyManager.connection_from_host does
            scheme, host, port = proxy.scheme or "http", proxy.host or host, proxy.port or port
        return self._new_pool(scheme, host, port, context)

    def _redirect(
        self, pool: HTTPConnectionPool, method: str, url: str, response: BaseHTTPResponse, kw: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]] | None:
        """Where urllib3's `PoolManager.urlopen` would go next: (method, URL, arguments), the
        answer drained, or None to return it (not a redirect, or redirects exhausted without
        raising); out of redirects with `raise_on_redirect`, its `MaxRetryError`."""
        location = response.get_redirect_location()
        if not location:
            return None
        location, kw, headers = urljoin(url, location), dict(kw), kw.get("headers", self.headers)
        if response.status == 303:  # RFC 9110 15.4.4: a GET, without the body or what describes it
            method, headers = "GET", HTTPHeaderDict(headers)._prepare_for_method_change()
            kw.update(body=None, chunked=False, body_pos=None)
        retries = Retry.from_int(kw.get("retries", response.retries), redirect=True)
        if retries.remove_headers_on_redirect and not pool.is_same_host(location):
            headers = headers.copy()
            for name in [name for name in headers if name.lower() in retries.remove_headers_on_redirect]:
                headers.pop(name, None)
        try:
            retries = retries.increment(method, url, response=response, _pool=pool)
        except MaxRetryError:
            if retries.raise_on_redirect:
                response.drain_conn()
                raise
            return None
        response.drain_conn()
        kw.update(retries=retries, headers=headers)
        return method, location, kw

