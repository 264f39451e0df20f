"""urllib3 door: `PharoxProxyManager`, a `urllib3.ProxyManager` that leases a proxy per request.

Code that holds ``urllib3.ProxyManager("http://proxy:3128")`` switches to
``PharoxProxyManager(broker)`` and nothing else changes::

    broker = LeaseBroker.from_proxies(["http://user:pass@10.0.0.1:3128", "socks5://10.0.0.2:1080"])
    with PharoxProxyManager(broker, headers={"User-Agent": "shop-bot"}) as http:
        r = http.request("GET", "https://example.com/")

How it is built: a request parses its URL once, goes from the leased proxy straight
to the right urllib3 `HTTPConnectionPool` and calls its `urlopen` as urllib3's
`ProxyManager` would (absolute URL and `Host` for forwarding, the path for CONNECT
tunnels and SOCKS).  A pool gets the arguments `ProxyManager` / `SOCKSProxyManager`
would give it for that one proxy (`_proxy`, `_proxy_headers`, `_socks_options`), so
urllib3's pools and connections still do forwarding, tunnels, HTTPS-to-proxy and SOCKS.
(A nested urllib3 `ProxyManager` per proxy parsed each URL four times and rebuilt a
pool key per request: ~90 µs more CPU per request than this at 10 proxies.)
Every pool lives in this manager's single `pools` LRU, keyed by proxy and target, so
`num_pools` bounds the pools across all proxies and an evicted pool is closed (a
response still streaming keeps its connection until it is done).

Redirects follow urllib3's `PoolManager` rules (303 turns into GET without a body,
unsafe headers dropped across hosts, `Retry` counts them), and every hop leases,
reports and releases its own proxy.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import ssl
import threading
import time
import warnings
import weakref
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import urljoin
from uuid import UUID

import urllib3
from pharox import ProxyFilters, ProxyProtocol
from urllib3 import HTTPHeaderDict
from urllib3.connection import ProxyConfig
from urllib3.connectionpool import HTTPConnectionPool, port_by_scheme
from urllib3.exceptions import (
    HTTPError,
    LocationValueError,
    MaxRetryError,
    ProxyError,
    ResponseError,
    SSLError,
    URLSchemeUnknown,
)
from urllib3.poolmanager import SSL_KEYWORDS
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry
from urllib3.util.url import Url, parse_url

from .attempts import ProxyAttempts, describe_error, mask_credentials
from .broker import HTTP_PROTOCOLS, LeaseBroker, ProxyLease
from .errors import AllProxiesFailed, ConfigurationError, NoProxyAvailable, PharoxIntegrationError
from .health import Verdict
from .settings import format_host

__all__ = [
    "AllProxiesFailedError",
    "LeaseFailedError",
    "NoProxyAvailableError",
    "PharoxProxyManager",
    "PharoxUrllib3Error",
    "ProxyNotLeasedError",
    "ReportFailedError",
]

logger = logging.getLogger("pharox_integrations.urllib3")

_SOCKS = frozenset({ProxyProtocol.SOCKS4, ProxyProtocol.SOCKS5})
_CLOSE_BATCH_SECONDS = 0.05
# RFC 9110 15.4.4: a 303 turns the request into a GET without a body, so the headers
# that describe that body go too (the same list as urllib3's PoolManager).
_BODY_HEADERS = (
    "Content-Encoding",
    "Content-Language",
    "Content-Location",
    "Content-Type",
    "Content-Length",
    "Digest",
    "Last-Modified",
    "Transfer-Encoding",
)


# ---------------------------------------------------------------------------- errors


class PharoxUrllib3Error(PharoxIntegrationError, HTTPError):
    """Base of this door's own errors: caught by ``except urllib3.exceptions.HTTPError``."""


class NoProxyAvailableError(NoProxyAvailable, PharoxUrllib3Error):
    """No proxy could be leased in time; the message names the pool and why."""

    @classmethod
    def wrap(cls, exc: NoProxyAvailable, note: str = "") -> NoProxyAvailableError:
        return cls(
            f"{exc}{note}",
            pool=exc.pool,
            filters=exc.filters,
            counts=exc.counts,
            next_revival_in=exc.next_revival_in,
        )


class LeaseFailedError(PharoxUrllib3Error):
    """The broker could not lease a proxy (storage down, broker closed)."""


class ProxyNotLeasedError(PharoxUrllib3Error):
    """`connection_from_*` was called with no proxy leased on this thread."""


class ReportFailedError(PharoxUrllib3Error):
    """Judging or recording a request's outcome failed (a ban detector raised, the storage
    failed); the proxy and the connection went back.  `__cause__` is the original error."""


class AllProxiesFailedError(AllProxiesFailed, MaxRetryError):
    """The request was moved between proxies and every one failed.

    A `MaxRetryError`, as plain urllib3 raises when its one proxy fails, so
    ``except MaxRetryError`` keeps working; `attempts` lists each proxy's outcome and
    `reason` is the last underlying error.
    """

    def __init__(
        self,
        attempts: Any,
        pool: HTTPConnectionPool | None = None,
        url: str | None = None,
        reason: Exception | None = None,
    ) -> None:
        # Both bases want to set the message; take AllProxiesFailed's and skip
        # MaxRetryError's constructor (it formats pool and url instead).
        self.attempts = list(attempts)
        Exception.__init__(self, str(AllProxiesFailed(self.attempts)))
        self.pool = pool  # type: ignore[assignment]
        self.url = url
        self.reason = reason

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (type(self), (self.attempts, None, self.url, self.reason))


# ---------------------------------------------------------------------------- hops


def _socks_pool_classes() -> Mapping[str, type[HTTPConnectionPool]]:
    """Imported on first use so the door imports without PySocks (the `socks` extra)."""
    from urllib3.contrib.socks import SOCKSProxyManager

    return SOCKSProxyManager.pool_classes_by_scheme


_SOCKS_VERSIONS = {ProxyProtocol.SOCKS4: 1, ProxyProtocol.SOCKS5: 2}  # PySocks' PROXY_TYPE_SOCKS4 / 5


class _Hop:
    """One proxy carrying one hop of a request on this thread."""

    __slots__ = ("lease", "pools")

    def __init__(self, lease: ProxyLease) -> None:
        self.lease = lease
        self.pools: list[HTTPConnectionPool] = []  # in use until the hop ends


class _LeaseOnResponse:
    """Releases a streamed response's lease once, when urllib3 gives its connection back."""

    __slots__ = ("lease", "manager")

    def __init__(self, manager: PharoxProxyManager, lease: ProxyLease) -> None:
        self.manager = manager
        self.lease = lease

    def __call__(self) -> None:
        self.manager._release(self.lease)


def _bind_lease(response: BaseHTTPResponse, release: _LeaseOnResponse) -> None:
    """Tie `release` to the moment the response lets go of its connection.

    urllib3 calls `release_conn()` when the body is read to the end (and from
    `drain_conn()`); users call `release_conn()` or `close()`; a response dropped
    unread is covered by a finalizer.  The wrappers hold the response weakly, so
    the response stays free of reference cycles.
    """
    ref = weakref.ref(response)
    cls = type(response)

    def release_conn() -> None:
        target = ref()
        try:
            if target is not None:
                cls.release_conn(target)
        finally:
            release()

    def close() -> None:
        target = ref()
        try:
            if target is not None:
                cls.close(target)
        finally:
            release()

    response.release_conn = release_conn  # type: ignore[method-assign]
    response.close = close  # type: ignore[method-assign]
    weakref.finalize(response, release)


def _discard(response: BaseHTTPResponse) -> None:
    """Close an answer nobody will read and give its connection's slot back to the pool
    (`close()` alone leaves the slot checked out: a blocking pool would run dry)."""
    response.close()
    response.release_conn()


def _report_failed(lease: ProxyLease, outcome: str, failed: Exception) -> ReportFailedError:
    """The error for an outcome the broker could not judge or record (names both; raise it
    `from failed`).  An `HTTPError` the judge raises is re-raised as it is instead."""
    return ReportFailedError(
        f"proxy {lease.safe_url}: judging or recording its outcome ({mask_credentials(outcome)}) "
        f"failed: {describe_error(failed)}"
    )


def _replayable(kw: Mapping[str, Any]) -> bool:
    """Only bodies we can send again may move to another proxy."""
    return isinstance(kw.get("body"), (type(None), bytes, str))


def _verdict_for(error: Exception) -> Verdict | None:
    """urllib3 errors that say nothing against the proxy (None: the policy decides).

    - `ResponseError` (inside `MaxRetryError`): the target answered too many
      redirects or retryable statuses; the proxy delivered every one of them.
    - `SSLError` that is not a `ProxyError`: the target's TLS handshake failed at the
      end of a working tunnel (bad certificate, wrong CA bundle).  urllib3 wraps a
      failed TLS handshake with the proxy itself in `ProxyError`.
    """
    reason = error.reason if isinstance(error, MaxRetryError) else error
    if isinstance(reason, ResponseError):
        return Verdict.TARGET_ERROR
    if isinstance(reason, SSLError) and not isinstance(reason, ProxyError):
        return Verdict.TARGET_ERROR
    return None


# ---------------------------------------------------------------------------- pool closing


class _Closer:
    """Closes evicted pools on one daemon thread, off the request path.

    With rotation nearly every request evicts a pool; closing its sockets inline
    showed up as ~2 ms on the evicting request in profiles of the 10,000-entry
    benchmark.  A pool waiting here is out of the LRU already: nobody can pick it up.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[HTTPConnectionPool] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def close(self, pool: HTTPConnectionPool) -> None:
        self._queue.put(pool)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="pharox-urllib3-closer", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Wake at most every `_CLOSE_BATCH_SECONDS`: a wake-up per evicted pool
            # would make every request of a rotating client pay a thread switch.
            time.sleep(_CLOSE_BATCH_SECONDS)
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for pool in batch:
                try:
                    pool.close()
                except Exception:  # a socket that fails to close is gone anyway
                    logger.debug("closing an evicted pool failed", exc_info=True)


_close_later = _Closer().close


# ---------------------------------------------------------------------------- manager


class PharoxProxyManager(urllib3.ProxyManager):
    """A drop-in `urllib3.ProxyManager` that leases a proxy from `broker` for each request.

    Takes the arguments of `urllib3.ProxyManager`, with `broker` in place of the proxy
    URL, plus:

    - `proxy_retries`: how many other proxies a request banned (403/429 by default)
      or failed by its proxy moves to before giving up; target errors and urllib3's
      `Retry` stay urllib3's business.
    - `pool`, `filters`, `session`: what to lease (defaults: the broker's).

    With ``preload_content=False`` the lease is held until the body is read to the
    end, or `release_conn()`, `drain_conn()` or `close()` is called; otherwise it is
    released before `request()` returns.  `clear()` (and leaving a ``with`` block)
    releases any lease still held by a response.  `proxy` is always None: there is
    no single proxy; see `current_lease` inside a request or a `leased()` block.
    """

    def __init__(
        self,
        broker: LeaseBroker,
        num_pools: int = 10,
        headers: Mapping[str, str] | None = None,
        proxy_headers: Mapping[str, str] | None = None,
        proxy_ssl_context: ssl.SSLContext | None = None,
        use_forwarding_for_https: bool = False,
        proxy_assert_hostname: str | Literal[False] | None = None,
        proxy_assert_fingerprint: str | None = None,
        *,
        proxy_retries: int = 2,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        session: str | None = None,
        **connection_pool_kw: Any,
    ) -> None:
        if proxy_retries < 0:
            raise ConfigurationError(f"proxy_retries={proxy_retries!r}: expected an integer >= 0")
        # Not ProxyManager.__init__: it wants one fixed proxy URL.  The per-proxy
        # settings it would store are kept here and given to each proxy's pools.
        urllib3.PoolManager.__init__(self, num_pools, headers, **connection_pool_kw)
        # Evicted pools are closed, but never under a request still using them (a
        # pool closed between `connection_from_*` and getting a connection raises
        # ClosedPoolError, urllib3 issue #1252): pools in use are counted per hop.
        self.pools.dispose_func = self._dispose
        self._in_use: dict[HTTPConnectionPool, int] = {}
        self._evicted: set[HTTPConnectionPool] = set()
        self._close_inline = False  # clear() closes at once; evictions close on the closer thread
        self.proxy = None
        self.proxy_headers = dict(proxy_headers or {})
        self.proxy_ssl_context = proxy_ssl_context
        self.proxy_config = self._proxy_options = ProxyConfig(
            proxy_ssl_context, use_forwarding_for_https, proxy_assert_hostname, proxy_assert_fingerprint
        )
        self.broker = broker
        self.proxy_retries = proxy_retries
        self.lease_pool = pool
        self.lease_filters = filters
        self.lease_session = session
        self._socks = importlib.util.find_spec("socks") is not None
        # None (no restriction) rather than ALL_PROTOCOLS keeps the storages' fast path.
        self.protocols = None if self._socks else HTTP_PROTOCOLS
        self._lock = threading.Lock()
        self._held: dict[ProxyLease, ProxyLease] = {}  # every lease this manager holds
        self._streams: dict[ProxyLease, ProxyLease] = {}  # those held by a response's body
        self._local = threading.local()

    # ------------------------------------------------------------------ urllib3 surface

    def urlopen(  # type: ignore[override]
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> BaseHTTPResponse:
        """`urllib3.ProxyManager.urlopen` through a leased proxy (``url`` must be absolute)."""
        target = parse_url(url)
        if target.scheme is None:
            warnings.warn(
                "URLs without a scheme are deprecated in urllib3 and will raise an error in urllib3 v3.0; "
                "start the URL with 'http://' or 'https://'",
                FutureWarning,
                stacklevel=2,
            )
        kw.setdefault("headers", self.headers)
        stack = self._stack()
        attempts = ProxyAttempts(self.broker, self.proxy_retries)
        while True:
            lease = self._acquire(url, attempts.tried)
            hop = _Hop(lease)
            stack.append(hop)
            try:
                pool, response = self._send(hop, method, url, target, kw)
                follow = self._redirect(pool, method, url, response, kw) if redirect else None
            except Exception as exc:
                try:
                    verdict = attempts.judge(lease, error=exc, verdict=_verdict_for(exc), release=True)
                except HTTPError:
                    raise
                except Exception as failed:
                    raise _report_failed(lease, describe_error(exc), failed) from failed
                finally:
                    self._release(lease)
                if attempts.should_move(verdict) and _replayable(kw):
                    self._log_move(lease, describe_error(exc))
                    continue
                if len(attempts.attempts) > 1:
                    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
                    raise AllProxiesFailedError(attempts.attempts, None, url, reason) from exc
                raise
            except BaseException:
                self._release(lease)  # interrupted: nothing to judge, but never leak
                raise
            finally:
                stack.pop()
                self._done_with(hop)
            if follow is not None:
                # urllib3 drained the redirect; this hop is done and the next one leases anew.
                try:
                    self.broker.finish(lease, status_code=response.status)
                except HTTPError:
                    raise
                except Exception as failed:
                    raise _report_failed(lease, f"HTTP {response.status}", failed) from failed
                finally:
                    self._release(lease)
                next_method, location, next_kw = follow
                return self.urlopen(next_method, location, redirect=redirect, **next_kw)
            # A body read later keeps the proxy; otherwise it goes back in the same broker call.
            streamed = not kw.get("preload_content", True) and response.connection is not None
            try:
                verdict = attempts.judge(lease, status_code=response.status, response=response, release=not streamed)
            except BaseException as failed:  # a ban detector or the storage: strand neither lease nor connection
                _discard(response)
                self._release(lease)
                if isinstance(failed, Exception) and not isinstance(failed, HTTPError):
                    raise _report_failed(lease, f"HTTP {response.status}", failed) from failed
                raise
            if attempts.should_move(verdict) and _replayable(kw):
                if kw.get("preload_content", True):
                    response.drain_conn()
                else:
                    _discard(response)  # do not read a ban page we are throwing away
                self._release(lease)
                self._log_move(lease, f"HTTP {response.status}")
                continue
            if streamed:
                with self._lock:
                    self._streams[lease] = lease
                _bind_lease(response, _LeaseOnResponse(self, lease))
            else:
                self._release(lease)
            return response

    def connection_from_host(
        self,
        host: str | None,
        port: int | None = None,
        scheme: str | None = "http",
        pool_kwargs: dict[str, Any] | None = None,
    ) -> HTTPConnectionPool:
        """The pool for `host` through the proxy leased on this thread (see `leased()`)."""
        hop = self._current_hop()
        if not host:
            raise LocationValueError("No host specified.")
        scheme = (scheme or "http").lower()
        if port is None:
            port = port_by_scheme.get(scheme, 80)
        return self._pool(hop, scheme, host.lower(), port, pool_kwargs)

    def connection_from_context(self, request_context: dict[str, Any]) -> HTTPConnectionPool:
        """Like `connection_from_host`, from urllib3's request-context dict."""
        context = dict(request_context)
        host, port, scheme = context.pop("host", None), context.pop("port", None), context.pop("scheme", "http")
        return self.connection_from_host(host, port, scheme, pool_kwargs=context)

    def clear(self) -> None:
        """Close every pool and release the leases streamed responses still hold.

        Requests in flight on other threads keep their pools until they finish.
        """
        with self.pools.lock:  # holding it keeps other threads' evictions out of the inline mode
            self._close_inline = True
            try:
                super().clear()
            finally:
                self._close_inline = False
        with self._lock:
            streams = list(self._streams.values())
        for lease in streams:  # requests in flight release their own leases
            self._release(lease)

    # ------------------------------------------------------------------ explicit leases

    @contextmanager
    def leased(self, url: str | None = None) -> Iterator[ProxyLease]:
        """Hold one proxy on this thread for `connection_from_*` (low-level pool use).

        ``with http.leased() as lease: pool = http.connection_from_url(url)``.  Report
        outcomes yourself with ``broker.report(lease, ...)``; the lease is released on
        exit (an escaping exception is reported against the proxy first).
        """
        lease = self._acquire(url)
        hop = _Hop(lease)
        stack = self._stack()
        stack.append(hop)
        try:
            yield lease
        except Exception as exc:
            if not lease.reported:
                self.broker.report(lease, error=exc)
            raise
        finally:
            stack.remove(hop)
            self._done_with(hop)
            self._release(lease)

    @property
    def current_lease(self) -> ProxyLease | None:
        """The lease carrying this thread's request in progress (or `leased()` block)."""
        stack = self._stack()
        return stack[-1].lease if stack else None

    @property
    def held(self) -> int:
        """Leases this manager holds now (streamed responses not yet released)."""
        with self._lock:
            return len(self._held)

    def __repr__(self) -> str:
        return f"<PharoxProxyManager pool={self.lease_pool or self.broker.pool!r} pools={len(self.pools)}>"

    # ------------------------------------------------------------------ internals

    def _stack(self) -> list[_Hop]:
        stack: list[_Hop] | None = getattr(self._local, "hops", None)
        if stack is None:
            stack = self._local.hops = []
        return stack

    def _current_hop(self) -> _Hop:
        stack = self._stack()
        if not stack:
            raise ProxyNotLeasedError(
                "no proxy is leased on this thread: use request()/urlopen(), or call "
                "connection_from_* inside `with manager.leased():`"
            )
        return stack[-1]

    def _acquire(self, url: str | None, avoid: Collection[UUID] = ()) -> ProxyLease:
        try:
            lease = self.broker.acquire(
                url,
                pool=self.lease_pool,
                filters=self.lease_filters,
                session=self.lease_session,
                protocols=self.protocols,
                avoid=avoid,
            )
        except NoProxyAvailable as exc:
            note = ""
            if not self._socks and exc.counts.get("wrong_protocol"):
                note = "; SOCKS proxies need the socks extra: pip install 'pharox-integrations[socks]'"
            raise NoProxyAvailableError.wrap(exc, note) from None
        except HTTPError:
            raise
        except Exception as exc:
            pool = self.lease_pool or self.broker.pool
            raise LeaseFailedError(f"could not lease a proxy from pool {pool!r}: {describe_error(exc)}") from exc
        with self._lock:
            self._held[lease] = lease
        return lease

    def _release(self, lease: ProxyLease) -> None:
        with self._lock:
            self._streams.pop(lease, None)
            if self._held.pop(lease, None) is None:
                return
        self.broker.release(lease)

    def _send(
        self, hop: _Hop, method: str, url: str, target: Url, kw: dict[str, Any]
    ) -> tuple[HTTPConnectionPool, BaseHTTPResponse]:
        """One hop, sent as `ProxyManager.urlopen` sends it, redirects left to `_redirect`."""
        scheme = target.scheme or "http"
        if not target.host:
            raise LocationValueError("No host specified.")
        pool = self._pool(hop, scheme, target.host, target.port or port_by_scheme.get(scheme, 80), None)
        send = dict(kw)
        send["assert_same_host"] = False
        send["redirect"] = False
        if not self._forwards(hop.lease, scheme):
            return pool, pool.urlopen(method, target.request_uri, **send)
        # The proxy gets the absolute URL (the pool drops any fragment) with the headers
        # `ProxyManager._set_proxy_headers` adds; the pool adds the proxy's own headers.
        headers = {"Accept": "*/*"}
        if target.netloc:
            headers["Host"] = target.netloc
        headers.update(kw["headers"])
        send["headers"] = headers
        return pool, pool.urlopen(method, url, **send)

    def _forwards(self, lease: ProxyLease, scheme: str) -> bool:
        """True when the proxy gets the absolute URL rather than a CONNECT tunnel (as
        `urllib3.util.proxy.connection_requires_http_tunnel` decides; never for SOCKS)."""
        protocol = lease.protocol
        if protocol in _SOCKS:
            return False
        return scheme == "http" or (protocol is ProxyProtocol.HTTPS and self._proxy_options.use_forwarding_for_https)

    def _redirect(
        self, pool: HTTPConnectionPool, method: str, url: str, response: BaseHTTPResponse, kw: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]] | None:
        """Where urllib3's `PoolManager.urlopen` would go next: (method, URL, arguments), or
        None to return `response` (not a redirect, or redirects exhausted without raising)."""
        location = response.get_redirect_location()
        if not location:
            return None
        location = urljoin(url, location)
        kw = dict(kw)
        if response.status == 303:
            method = "GET"
            kw["body"] = None
            kw["chunked"] = False
            kw["body_pos"] = None
            headers = HTTPHeaderDict(kw["headers"])
            for name in _BODY_HEADERS:
                headers.discard(name)
            kw["headers"] = headers
        retries = kw.get("retries", response.retries)
        if not isinstance(retries, Retry):
            retries = Retry.from_int(retries, redirect=True)
        if retries.remove_headers_on_redirect and not pool.is_same_host(location):
            unsafe = retries.remove_headers_on_redirect
            kept = kw["headers"].copy()
            for name in kw["headers"]:
                if name.lower() in unsafe:
                    kept.pop(name, None)
            kw["headers"] = kept
        try:
            retries = retries.increment(method, url, response=response, _pool=pool)
        except MaxRetryError:
            if retries.raise_on_redirect:
                response.drain_conn()
                raise
            return None
        kw["retries"] = retries
        response.drain_conn()
        return method, location, kw

    def _pool(
        self, hop: _Hop, scheme: str, host: str, port: int, pool_kwargs: Mapping[str, Any] | None
    ) -> HTTPConnectionPool:
        """Get or make the hop's pool for a target in the one LRU shared by every proxy.

        Pools are picked as `ProxyManager.connection_from_host` picks them (plain HTTP
        through an HTTP(S) proxy shares the proxy's own pool) but keyed by proxy and
        target only: a proxy's pool arguments are fixed, so urllib3's full pool key
        would cost a normalisation per request for nothing.  Pools asked for with
        extra `pool_kwargs` are keyed by those too.
        """
        lease = hop.lease
        socks = lease.protocol in _SOCKS
        if scheme not in ("http", "https"):
            raise URLSchemeUnknown(scheme)
        key: Any = (
            (lease.proxy_id, lease.url)
            if not socks and scheme == "http"
            else (lease.proxy_id, lease.url, scheme, host, port)
        )
        if pool_kwargs:
            key += (repr(sorted(pool_kwargs.items())),)
        with self.pools.lock:  # also serialises eviction (`_dispose`) and the in-use counts
            pool = self.pools.get(key)
            if pool is not None:
                return self._use(hop, pool)
        # Built outside the lock: threads rotating over many proxies would queue on it.
        fresh = self._new_proxy_pool(lease, socks, scheme, host, port, pool_kwargs)
        with self.pools.lock:
            pool = self.pools.get(key)
            if pool is None:
                pool = self.pools[key] = fresh
            self._use(hop, pool)
        if pool is not fresh:
            fresh.close()  # another thread made it first; this one never connected
        return pool

    def _use(self, hop: _Hop, pool: HTTPConnectionPool) -> HTTPConnectionPool:
        """Count one more user of `pool` (until `_done_with`); caller holds `pools.lock`."""
        self._in_use[pool] = self._in_use.get(pool, 0) + 1
        hop.pools.append(pool)
        return pool

    def _new_proxy_pool(
        self, lease: ProxyLease, socks: bool, scheme: str, host: str, port: int, overrides: Mapping[str, Any] | None
    ) -> HTTPConnectionPool:
        """A pool through `lease`'s proxy, with the arguments `ProxyManager` (or
        `SOCKSProxyManager`) would give it, built as `PoolManager._new_pool` builds it."""
        kw = dict(self.connection_pool_kw)
        if socks:
            kw["_socks_options"] = {
                "socks_version": _SOCKS_VERSIONS[lease.protocol],
                "proxy_host": lease.host,
                "proxy_port": lease.port,
                "username": lease.username,
                "password": lease.password,
                "rdns": False,
            }
            pool_classes = _socks_pool_classes()
        else:
            proxy_scheme = lease.protocol.value
            proxy_host = format_host(lease.host)
            # What parse_url makes of the proxy URL, without parsing one per proxy.
            if proxy_host.isascii():
                proxy = Url(proxy_scheme, host=proxy_host.lower(), port=lease.port)
            else:
                proxy = parse_url(lease.safe_url)
            proxy_headers = dict(self.proxy_headers)
            if lease.proxy_authorization is not None:
                proxy_headers["Proxy-Authorization"] = lease.proxy_authorization
            if proxy_scheme == "https" and self._proxy_options.use_forwarding_for_https and kw.get("ssl_context"):
                warnings.warn(
                    "ssl_context with use_forwarding_for_https=True is deprecated in urllib3 and will raise "
                    "an error in urllib3 v3.0; use proxy_ssl_context for the TLS connection to the proxy",
                    FutureWarning,
                    stacklevel=5,
                )
            kw["_proxy"] = proxy
            kw["_proxy_headers"] = proxy_headers
            kw["_proxy_config"] = self.proxy_config
            pool_classes = self.pool_classes_by_scheme
            if scheme == "http":  # forwarded: the pool connects to the proxy itself
                scheme, host, port = proxy_scheme, proxy.host or "", lease.port
        for name, value in (overrides or {}).items():
            if value is None:
                kw.pop(name, None)
            else:
                kw[name] = value
        if kw.get("blocksize") is None:
            kw.pop("blocksize", None)  # the connection's own default
        if scheme == "http":
            for name in SSL_KEYWORDS:
                kw.pop(name, None)
        return pool_classes[scheme](host, port, **kw)

    def _dispose(self, pool: HTTPConnectionPool) -> None:
        """LRU eviction or `clear()`: close the pool now, or when its last request ends."""
        with self.pools.lock:
            if self._in_use.get(pool):
                self._evicted.add(pool)
                return
            if self._close_inline:
                pool.close()
                return
        _close_later(pool)

    def _done_with(self, hop: _Hop) -> None:
        closing = []
        with self.pools.lock:
            for pool in hop.pools:
                left = self._in_use.pop(pool) - 1
                if left:
                    self._in_use[pool] = left
                elif pool in self._evicted:
                    self._evicted.discard(pool)
                    closing.append(pool)
            hop.pools.clear()
        for pool in closing:
            _close_later(pool)

    def _log_move(self, lease: ProxyLease, detail: str) -> None:
        logger.info(
            "moving request off proxy %(proxy)s after %(detail)s",
            {"proxy": lease.safe_url, "detail": mask_credentials(detail)},
        )
