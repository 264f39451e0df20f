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

A ban or a proxy failure moves the request to another proxy, up to `proxy_retries`
times (the decision is the core's `ProxyAttempts`); target-side errors are left to
requests' `max_retries`.  When every try fails the caller gets the last response, or
an `AllProxiesFailedError` (a `requests.ConnectionError`) naming each proxy's outcome.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import ssl
import sys
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import requests
from pharox import ProxyFilters
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, DEFAULT_RETRIES, HTTPAdapter
from requests.exceptions import ContentDecodingError, RequestException
from requests.models import PreparedRequest, Response
from requests.utils import get_environ_proxies, select_proxy, should_bypass_proxies
from urllib3.util.retry import Retry

from .attempts import ProxyAttempts, causes, is_dropped_connection
from .broker import HTTP_PROTOCOLS, LeaseBroker, ProxyLease
from .errors import AllProxiesFailed, NoProxyAvailable, ProxyAuthenticationFailed
from .health import Verdict

try:  # the `socks` extra: without PySocks only HTTP(S) proxies are leased
    import socks as _socks

    _SOCKS_AUTH_ERRORS: tuple[type[BaseException], ...] = (_socks.SOCKS5AuthError,)
    _PROTOCOLS = None  # every protocol
except ImportError:  # pragma: no cover - PySocks is installed with the socks extra
    _SOCKS_AUTH_ERRORS = ()
    _PROTOCOLS = HTTP_PROTOCOLS

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


# ---------------------------------------------------------------------- deferred releases


class _Reaper:
    """Releases leases of responses dropped without being closed, off the dropping thread
    (and closes evicted connection pools off the request path).

    A garbage-collected response can be collected at any allocation, possibly while
    this thread is inside the broker or its storage: releasing there could re-enter
    them.  `SimpleQueue.put` is safe from finalizers; one daemon thread does the work.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Started from adapter construction (ordinary code), never from a finalizer."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pharox-requests-reaper", daemon=True)
                self._thread.start()

    def put(self, job: Callable[[], object]) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:  # keep serving the others
                logger.exception("background release or pool close failed")


_reaper = _Reaper()


# ---------------------------------------------------------------------- adapter


@dataclass
class _Held:
    lease: ProxyLease
    finalizer: weakref.finalize[Any, Any] | None = None


class PharoxAdapter(HTTPAdapter):
    """A `requests` transport adapter that sends each request through a leased proxy.

    `broker` is a `LeaseBroker`; `pool` and `filters` override the broker's defaults;
    `proxy_retries` is how many other proxies a banned or failed request may move to;
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
        proxy_retries: int = 3,
        trust_env: bool = True,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        max_retries: int | Retry = DEFAULT_RETRIES,
        pool_block: bool = DEFAULT_POOLBLOCK,
    ) -> None:
        if proxy_retries < 0:
            raise ValueError(f"proxy_retries={proxy_retries!r}: expected an integer >= 0")
        if pool_connections < 1:
            raise ValueError(f"pool_connections={pool_connections!r}: expected an integer >= 1")
        self.broker = broker
        self.pool = pool
        self.filters = filters
        self.proxy_retries = proxy_retries
        self.trust_env = trust_env
        self._lock = threading.Lock()
        self._held: dict[ProxyLease, _Held] = {}
        self._pins: Counter[str] = Counter()
        self._local = threading.local()
        super().__init__(pool_connections, pool_maxsize, max_retries, pool_block)
        _reaper.start()

    def __repr__(self) -> str:
        return f"<PharoxAdapter pool={self.pool or self.broker.pool!r} held={self.held}>"

    @property
    def held(self) -> int:
        """Leases this adapter holds right now (in-flight requests and open streams)."""
        with self._lock:
            return len(self._held)

    # ------------------------------------------------------------------ connection pools

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = DEFAULT_POOLBLOCK, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kw)
        self._max_managers = max(1, connections)
        self._pool_args = (connections, maxsize, block)
        # requests' own cache is a plain dict that grows by one manager per proxy
        # forever; ours is ordered by last use and bounded by `pool_connections`.
        self.proxy_manager = OrderedDict()

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """requests' per-proxy manager, from a bounded LRU.

        A manager in use by a `send()` in progress is pinned, never evicted: closing
        its pools between "get a pool" and "get a connection" would fail the request.
        An evicted manager is `clear()`ed; a response still streaming from one of its
        connections keeps reading, and that connection is closed when released.
        A new manager is built outside the lock (threads rotating over many proxies
        would otherwise queue behind each other's construction).
        """
        with self._lock:
            manager = self.proxy_manager.get(proxy)
            evicted = self._use(proxy) if manager is not None else []
        if manager is None:
            fresh = self._build_manager(proxy, **proxy_kwargs)
            with self._lock:
                manager = self.proxy_manager.setdefault(proxy, fresh)  # another thread may have won
                evicted = self._use(proxy)
            if manager is not fresh:
                fresh.clear()  # nothing was opened through it
        self._close_later(evicted)
        return manager

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

    def _use(self, proxy: str) -> list[Any]:
        """Mark `proxy` most recently used, pin it for this send, evict (caller holds the lock)."""
        cache = self.proxy_manager
        assert isinstance(cache, OrderedDict)
        cache.move_to_end(proxy)
        pins: list[str] | None = getattr(self._local, "pins", None)
        if pins is not None:
            pins.append(proxy)
            self._pins[proxy] += 1
        return self._evict()

    def _evict(self) -> list[Any]:
        """Drop least-recently-used unpinned managers beyond the bound (caller holds the lock)."""
        cache = self.proxy_manager
        evicted = []
        while len(cache) > self._max_managers:
            victim = next((key for key in cache if not self._pins.get(key)), None)
            if victim is None:
                break  # every one is in use; shrink when they are unpinned
            evicted.append(cache.pop(victim))
        return evicted

    @staticmethod
    def _close_later(managers: list[Any]) -> None:
        """Close evicted managers' idle connections on the reaper thread.

        Closing a connection the proxy used a moment ago waits for the proxy to react
        (~150 µs here against ~25 µs for an older one); the request need not wait.
        """
        for manager in managers:
            _reaper.put(manager.clear)

    def _send_pinned(self, request: PreparedRequest, **kwargs: Any) -> Response:
        """`HTTPAdapter.send`, with the proxy manager it picks pinned until it returns."""
        pins: list[str] = []
        self._local.pins = pins
        try:
            return super().send(request, **kwargs)
        finally:
            self._local.pins = None
            if pins:
                with self._lock:
                    for key in pins:
                        self._pins[key] -= 1
                        if self._pins[key] <= 0:
                            del self._pins[key]
                    evicted = self._evict()
                self._close_later(evicted)

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
            return self._send_pinned(request, proxies=dict(proxies or {}), **kwargs)
        if self._bypassed(url, proxies):
            return self._send_pinned(request, proxies={}, **kwargs)
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

    def _acquire(self, url: str, avoid: Collection[UUID] = ()) -> ProxyLease:
        lease = self.broker.acquire(url, pool=self.pool, filters=self.filters, protocols=_PROTOCOLS, avoid=avoid)
        with self._lock:
            self._held[lease] = _Held(lease)
        return lease

    def _release(self, lease: ProxyLease) -> None:
        """Return the lease to the broker; every path ends here (idempotent)."""
        with self._lock:
            held = self._held.pop(lease, None)
        if held is not None and held.finalizer is not None:
            held.finalizer.detach()
        self.broker.release(lease)

    def _send_leased(self, request: PreparedRequest, url: str, *, stream: bool, **kwargs: Any) -> Response:
        if "Proxy-Authorization" in request.headers:
            # Meant for another proxy (Session adds it from environment proxies on
            # redirects): through a tunnel or SOCKS it would reach the target.
            request = request.copy()
            del request.headers["Proxy-Authorization"]
        attempts = ProxyAttempts(self.broker, self.proxy_retries)
        try:
            lease = self._acquire(url)
        except NoProxyAvailable as exc:
            raise _no_proxy_error(exc, request) from exc
        resent = False
        while True:
            response: Response | None = None
            try:
                response = self._send_pinned(
                    request, stream=stream, proxies={"http": lease.url, "https": lease.url}, **kwargs
                )
                if stream:
                    self._hold_until_closed(lease, response)
                else:
                    response.content  # noqa: B018  # read here, so body errors can move the request
            except Exception as exc:
                if response is not None:
                    response.close()
                elif not resent and _replayable(request) and is_dropped_connection(exc):
                    resent = True  # a kept-alive connection the proxy had closed: once more, same proxy
                    continue
                try:
                    verdict = _judge_error(attempts, lease, exc)
                finally:
                    self._release(lease)
                if not verdict.moves_request or not isinstance(exc, RequestException):
                    raise
                if not attempts.should_move(verdict):
                    raise _all_failed(attempts, exc, request) from exc
                self._log_move(attempts)
                try:
                    lease = self._acquire(url, attempts.tried)
                except NoProxyAvailable as none:
                    raise _all_failed(attempts, exc, request, none) from exc
                continue
            except BaseException:  # KeyboardInterrupt and friends: give the proxy back, no verdict
                if response is not None:
                    response.close()
                self._release(lease)
                raise
            try:
                response.pharox_proxy = lease.safe_url  # type: ignore[attr-defined]
                verdict = attempts.judge(lease, status_code=response.status_code, response=response, release=not stream)
            except BaseException:  # a failing ban detector or storage: nothing may stay held
                response.close()
                self._release(lease)
                raise
            if not stream:
                self._release(lease)
            if not attempts.should_move(verdict):
                return response
            self._release(lease)
            self._log_move(attempts)
            try:
                lease = self._acquire(url, attempts.tried)
            except NoProxyAvailable:
                return response  # no other proxy: the caller gets the last answer
            except BaseException:
                response.close()
                raise
            response.close()

    def _log_move(self, attempts: ProxyAttempts) -> None:
        last = attempts.attempts[-1]
        logger.info(
            "proxy %(proxy)s: %(outcome)s (%(detail)s); moving the request to another proxy (%(left)d tries left)",
            {"proxy": last.proxy, "outcome": last.outcome, "detail": last.detail, "left": attempts.retries_left},
        )

    def _hold_until_closed(self, lease: ProxyLease, response: Response) -> None:
        """Tie the lease to the streamed body: released at its end, on close, or on GC.

        urllib3 calls `release_conn` when the body has been read to the end, and
        `Response.close()` calls it too; `raw.close()` and garbage collection go
        through the reaper because they may run inside a finalizer.
        """
        raw = response.raw
        with self._lock:
            held = self._held.get(lease)
        if raw is None or held is None:
            return
        raw_ref = weakref.ref(raw)  # the wrappers live on raw: no reference cycle
        release = self._release

        def release_conn() -> None:
            try:
                target = raw_ref()
                if target is not None:
                    type(target).release_conn(target)
            finally:
                release(lease)

        def close() -> None:
            try:
                target = raw_ref()
                if target is not None:
                    type(target).close(target)
            finally:
                if not lease.released:
                    _reaper.put(lambda: release(lease))

        raw.release_conn = release_conn  # type: ignore[method-assign]
        raw.close = close  # type: ignore[method-assign]
        finalizer = weakref.finalize(raw, _reaper.put, lambda: release(lease))
        finalizer.atexit = False  # at exit the broker's own close() releases what is left
        held.finalizer = finalizer

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Release the leases still held by this adapter and close every connection pool.

        Safe to call twice (`Session.close()` calls it once per mounted prefix).
        """
        with self._lock:
            leases = [held.lease for held in self._held.values()]
            managers = list(self.proxy_manager.values())
            self.proxy_manager.clear()
        for lease in leases:
            try:
                self._release(lease)
            except Exception:  # keep releasing the others; the broker logged it
                logger.exception("could not release the lease of %(proxy)s", {"proxy": lease.safe_url})
        if leases:
            logger.info("released %(n)d lease(s) still held at adapter close", {"n": len(leases)})
        self.poolmanager.clear()
        for manager in managers:
            manager.clear()


# ---------------------------------------------------------------------- helpers


def _replayable(request: PreparedRequest) -> bool:
    """A body requests can send again as it is (not a generator or file already read)."""
    return request.body is None or isinstance(request.body, (bytes, str))


def _door_verdict(exc: BaseException) -> tuple[Verdict | None, int | None]:
    """What this door knows better than the generic policy about a requests error.

    Returns (verdict or None to let the policy judge, status code of a failed CONNECT).
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


def _judge_error(attempts: ProxyAttempts, lease: ProxyLease, exc: BaseException) -> Verdict:
    """Judge a failed request and give its proxy back (the caller's `_release` then only
    forgets it)."""
    verdict, status = _door_verdict(exc)
    if status is not None:  # the proxy answered CONNECT with this status: judge it as one
        return attempts.judge(lease, status_code=status, verdict=verdict, release=True)
    return attempts.judge(lease, error=exc, verdict=verdict, release=True)


def _auth_failed(attempts: ProxyAttempts, exc: BaseException) -> bool:
    if attempts.attempts and attempts.attempts[-1].detail == "HTTP 407":
        return True
    return any(isinstance(c, _SOCKS_AUTH_ERRORS) for c in causes(exc))


def _all_failed(
    attempts: ProxyAttempts,
    exc: BaseException,
    request: PreparedRequest,
    none_left: NoProxyAvailable | None = None,
) -> AllProxiesFailedError:
    cls = ProxyAuthenticationError if _auth_failed(attempts, exc) else AllProxiesFailedError
    error = attempts.failure(cls)
    if none_left is not None:
        error = cls(attempts.attempts, f"{error}; no other proxy to try: {none_left}")
    assert isinstance(error, AllProxiesFailedError)
    error.request = request
    return error


def _no_proxy_error(exc: NoProxyAvailable, request: PreparedRequest) -> NoProxyAvailableError:
    error = NoProxyAvailableError(
        str(exc), pool=exc.pool, filters=exc.filters, counts=exc.counts, next_revival_in=exc.next_revival_in
    )
    error.request = request
    return error


def pharox_session(broker: LeaseBroker, **adapter_kwargs: Any) -> requests.Session:
    """A `requests.Session` with a `PharoxAdapter(broker, **adapter_kwargs)` on http:// and https://."""
    session = requests.Session()
    adapter = PharoxAdapter(broker, **adapter_kwargs)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
