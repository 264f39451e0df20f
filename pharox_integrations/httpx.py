"""httpx door: `PharoxTransport` / `AsyncPharoxTransport`, a leased proxy per request.

    client = httpx.Client(transport=PharoxTransport(broker))
    client = httpx.AsyncClient(transport=AsyncPharoxTransport(broker))

Each request opens an `Exchange` (see `pharox_integrations.exchange`): it leases a
proxy, goes out through a per-proxy inner httpx transport (a bounded LRU of them),
and the exchange says what comes next (hand the answer over, send again, move to
another proxy, raise).  The door only translates: httpx's answers and errors into
exchange calls, the exchange's steps into httpx I/O.  The two transports differ in
their I/O only (blocking calls or awaits).  The proxy goes back when the response
stream is closed, never before; the async side never blocks the event loop (a
blocking storage such as SQL is called from a worker thread).

Per-request options go in `extensions={"pharox": {"pool": ..., "session": ...,
"filters": ProxyFilters(...)}}`; the response says which proxy served it in
`response.extensions["pharox"]` (no credentials).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

import httpx
from pharox import ProxyFilters, ProxyProtocol

from .broker import HTTP_PROTOCOLS, LeaseBroker, ProxyLease
from .errors import (
    AllProxiesFailed,
    InvalidProxyURL,
    NoProxyAvailable,
    PharoxIntegrationError,
    ProxyAuthenticationFailed,
    ReportFailed,
)
from .exchange import DoorErrors, Exchange, Step, describe_error, moves_keyword
from .routes import CLOSER, Route, RouteCache

__all__ = [
    "SPOKEN_PROTOCOLS",
    "AllProxiesFailedError",
    "AsyncPharoxTransport",
    "InvalidProxyURLError",
    "NoProxyAvailableError",
    "PharoxTransport",
    "PharoxTransportError",
    "ProxyAuthenticationFailedError",
    "ReportFailedError",
]

logger = logging.getLogger("pharox_integrations.httpx")


def _spoken() -> frozenset[ProxyProtocol]:
    """httpx speaks http/https proxies, and SOCKS5 when its socks extra is installed."""
    try:
        import socksio  # noqa: F401
    except ImportError:
        return HTTP_PROTOCOLS
    return HTTP_PROTOCOLS | {ProxyProtocol.SOCKS5}


#: The proxy protocols these transports lease (SOCKS4 is not supported by httpx).
SPOKEN_PROTOCOLS = _spoken()

_EXTENSION = "pharox"
_DEFAULT_MAX_TRANSPORTS = 128
# What a closed leased stream holds instead of the inner one.  httpx's client keeps each
# response in a reference cycle (response -> its bound stream -> response), so whatever
# a closed stream still points at waits for the garbage collector instead of being
# freed at once: letting go of httpcore's stream frees its request graph on close.
_CLOSED = httpx.ByteStream(b"")


class _MaskSocksAuth(logging.Filter):
    """httpcore's DEBUG trace of a SOCKS5 handshake prints the proxy credentials
    (`auth=(b'user', b'password')`, the last field of the line): mask them."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "auth=(" in text:
            record.msg, record.args = _SOCKS_AUTH.sub("auth=(***)", text), None
        return True


_SOCKS_AUTH = re.compile(r"auth=\(.*", re.S)
if not any(isinstance(f, _MaskSocksAuth) for f in logging.getLogger("httpcore.socks").filters):
    logging.getLogger("httpcore.socks").addFilter(_MaskSocksAuth())


# ---------------------------------------------------------------------- errors


class PharoxTransportError(PharoxIntegrationError, httpx.TransportError):
    """Base of this door's errors: `except httpx.HTTPError` code keeps catching them."""


class NoProxyAvailableError(NoProxyAvailable, PharoxTransportError):
    """No proxy could be leased before the acquire timeout (proxywhirl: pool empty)."""


class AllProxiesFailedError(AllProxiesFailed, PharoxTransportError, httpx.ProxyError):
    """Every proxy tried failed; `.attempts` says what happened on each (named once)."""


class ProxyAuthenticationFailedError(ProxyAuthenticationFailed, AllProxiesFailedError):
    """The last proxy tried refused our credentials (HTTP 407 or SOCKS authentication)."""


class ReportFailedError(ReportFailed, PharoxTransportError):
    """A ban detector or the storage failed on an outcome; the proxy went back all the same."""


class InvalidProxyURLError(InvalidProxyURL, PharoxTransportError):
    """httpx cannot use a leased proxy's URL."""


_ERRORS = DoorErrors(
    no_proxy=NoProxyAvailableError,
    all_failed=AllProxiesFailedError,
    auth_failed=ProxyAuthenticationFailedError,
    report_failed=ReportFailedError,
)


def _as_httpx(exc: BaseException, request: httpx.Request) -> BaseException:
    """What the caller sees: an httpx error carrying its request (cancellations as they are)."""
    if isinstance(exc, PharoxTransportError):
        exc.request = request
    elif isinstance(exc, Exception) and not isinstance(exc, httpx.HTTPError):
        # A storage failing while leasing, say: `except httpx.HTTPError` code still holds.
        error = PharoxTransportError(describe_error(exc), request=request)
        error.__cause__ = exc
        return error
    return exc


# ---------------------------------------------------------------------- inner transports

T = TypeVar("T", httpx.HTTPTransport, httpx.AsyncHTTPTransport)


def _proxy_config(lease: ProxyLease) -> httpx.Proxy:
    """httpx's proxy object, credentials kept apart from the URL (and masked in its repr)."""
    auth = (lease.username, lease.password or "") if lease.username is not None else None
    try:
        return httpx.Proxy(lease.safe_url, auth=auth)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidProxyURLError(f"httpx cannot use proxy {lease.safe_url}: {describe_error(exc)}") from None


def _transport_factory(cls: Callable[..., T], kwargs: dict[str, Any]) -> Callable[[ProxyLease], T]:
    """Inner transports for one proxy each, sharing one SSL context built once."""
    for reserved in ("proxy", "uds", "mounts"):
        if reserved in kwargs:
            raise TypeError(f"{reserved}= cannot be used with a Pharox transport: the broker picks the proxy")
    options = dict(kwargs)
    verify = options.pop("verify", True)
    cert = options.pop("cert", None)
    trust_env = options.pop("trust_env", True)
    context: ssl.SSLContext = (
        verify
        if isinstance(verify, ssl.SSLContext) and cert is None
        else httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    )

    def make(lease: ProxyLease) -> T:
        proxy = _proxy_config(lease)
        if proxy.url.scheme == "https" and proxy.ssl_context is None:
            proxy.ssl_context = context  # TLS to the proxy itself: no bundle load per transport
        return cls(verify=context, trust_env=trust_env, proxy=proxy, **options)

    return make


# ---------------------------------------------------------------------- the request, once for both sides

R = TypeVar("R")


def _complete(steps: Coroutine[Any, Any, R]) -> R:
    """Run the sync transport's steps: its I/O blocks, so they never suspend."""
    try:
        steps.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    steps.close()
    raise RuntimeError("a PharoxTransport step awaited asynchronous I/O")


class _Door(Generic[T]):
    """The request life cycle, written once as coroutines; each transport supplies its I/O.

    The sync transport's I/O calls block and return, so its coroutines never suspend
    and run to the end in one step (`_complete`); the async one awaits.
    """

    _inner: Callable[..., T]  # the inner transport class
    # The I/O, one of each per side:
    _lease: Callable[[Exchange], Awaitable[ProxyLease]]
    _send: Callable[[T, httpx.Request], Awaitable[httpx.Response]]
    _failed: Callable[[Exchange, Exception], Awaitable[Step]]
    _answered: Callable[[Exchange, httpx.Response], Awaitable[Step]]
    _close: Callable[[Exchange, BaseException | None], Awaitable[None]]
    _shut: Callable[[httpx.Response], Awaitable[None]]  # close an answer
    _close_idle: Callable[[T], Awaitable[None]]  # close an inner transport no request uses

    def __init__(
        self,
        broker: LeaseBroker,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        max_moves: int | None = None,
        raise_on_exhausted: bool = False,
        max_proxy_transports: int = _DEFAULT_MAX_TRANSPORTS,
        proxy_retries: int | None = None,
        **transport_kwargs: Any,
    ) -> None:
        self.max_moves = moves_keyword(max_moves, proxy_retries=proxy_retries)
        self.broker = broker
        self.pool = pool
        self.filters = filters
        self.raise_on_exhausted = raise_on_exhausted
        self._make: Callable[[ProxyLease], T] = _transport_factory(self._inner, transport_kwargs)
        # Keyed by the proxy's URL with its credentials: a proxy whose address or
        # credentials changed gets a new route (the old one ages out), and a string
        # keeps its hash where a proxy id (a UUID) is hashed in Python at every lookup.
        self._routes: RouteCache[str, T] = RouteCache(max_proxy_transports, setting="max_proxy_transports")

    def _open(self, request: httpx.Request) -> Exchange:
        """The request's exchange, with this transport's options or the request's own."""
        pool, filters, session = self.pool, self.filters, None
        extra = request.extensions.get(_EXTENSION)
        if extra:
            if not isinstance(extra, dict) or not set(extra) <= {"pool", "session", "filters"}:
                raise PharoxTransportError(
                    f'extensions["{_EXTENSION}"] must be a dict with keys pool, session, filters; got {extra!r}',
                    request=request,
                )
            pool, filters, session = extra.get("pool", pool), extra.get("filters", filters), extra.get("session")
        # A caller's Proxy-Authorization would ride the tunnel to the target (or reach
        # the wrong proxy): the proxy's own credentials are added by the inner transport.
        if "proxy-authorization" in request.headers:
            del request.headers["proxy-authorization"]
        timeout = request.extensions.get("timeout")
        stream = request.stream
        # The host, not the URL: making the URL a string (without user info) costs more
        # than a tenth of the lease, and the host is all the site needs.
        return self.broker.exchange(
            host=request.url.host,
            pool=pool,
            filters=filters,
            session=session,
            protocols=SPOKEN_PROTOCOLS,
            max_moves=self.max_moves,
            body=None if isinstance(stream, httpx.ByteStream) else stream,  # bytes replay, streams don't
            timeout=timeout.get("pool") if timeout else None,
            errors=_ERRORS,
        )

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        """Lease, send, and do what the exchange says until an answer goes to the caller."""
        ex = self._open(request)
        try:
            while True:
                lease = await self._lease(ex)
                route, stale = self._routes.checkout(lease.url, partial(self._make, lease))
                held: Route[str, T] | None = route  # checked in on every way out but a hand-over
                response: httpx.Response | None = None
                try:
                    for transport in stale:
                        await self._close_idle(transport)
                    while True:
                        try:
                            response = await self._send(route.value, request)
                        except Exception as exc:
                            step = await self._failed(ex, exc)
                            if step is Step.RESEND:
                                continue
                            if step is Step.MOVE:
                                break
                            raise self._failure(ex, exc)  # noqa: B904 (the cause is set)
                        step = await self._answered(ex, response)
                        if step is Step.RETURN and self._keeps(ex):
                            held = None
                            return self._hand_over(ex, route, response)
                        if step is Step.MOVE:
                            break
                        raise self._failure(ex)
                finally:
                    if held is not None:
                        await self._done(held, response)
        except BaseException as exc:
            await self._close(ex, None)
            raise _as_httpx(exc, request)  # noqa: B904 (the same error, or one chained to it)

    def _keeps(self, ex: Exchange) -> bool:
        """The answer of a RETURN step goes to the caller (unless `raise_on_exhausted` refuses a ban)."""
        verdict = None if ex.current is None else ex.current.verdict
        return not (self.raise_on_exhausted and verdict is not None and verdict.site_refusal)

    @staticmethod
    def _failure(ex: Exchange, cause: BaseException | None = None) -> BaseException:
        """What a RAISE step (or a ban refused by `raise_on_exhausted`) ends the request with."""
        error = ex.error if ex.error is not None else ex.failure()
        if cause is not None and error is not cause:
            error.__cause__ = cause
        return error

    def _hand_over(self, ex: Exchange, route: Route[str, T], response: httpx.Response) -> httpx.Response:
        """The answer goes to the caller; its stream now owns the exchange and the route."""
        lease = ex.current
        assert lease is not None
        # The response's own dict (httpcore makes one per response): set, not copied.
        response.extensions[_EXTENSION] = {"proxy": lease.safe_url, "attempts": [str(a) for a in ex.attempts]}
        response.stream = _LeasedStream(response.stream, self, ex, route)
        return response

    async def _done(self, route: Route[str, T], response: httpx.Response | None) -> None:
        """The request is done with `route`: its answer closed, the route checked in."""
        try:
            if response is not None:
                await self._shut(response)
        finally:
            idle = self._routes.checkin(route)
            if idle is not None:
                await self._close_idle(idle)

    async def _ended(self, ex: Exchange, route: Route[str, T], error: BaseException | None) -> None:
        """A handed-over answer's stream was closed (`error`: reading it failed)."""
        try:
            await self._close(ex, error)
        finally:
            await self._done(route, None)

    @property
    def proxy_transports(self) -> int:
        """How many per-proxy inner transports are open."""
        return len(self._routes)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pool={self.pool or self.broker.pool!r} proxies_open={self.proxy_transports}>"


class _LeasedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """The answer's stream: closing it ends the exchange (the lease goes back) and checks
    the route in.  One class for both sides, as httpx's own `ByteStream`."""

    def __init__(self, inner: Any, door: _Door[Any], ex: Exchange, route: Route[str, Any]) -> None:
        self._inner = inner
        self._door = door
        self._ex: Exchange | None = ex
        self._route = route
        self._error: BaseException | None = None  # reading the body failed
        self._chunks: AsyncIterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except Exception as exc:
            self._error = exc
            raise

    def __aiter__(self) -> AsyncIterator[bytes]:
        # An iterator object, not an async generator: asyncio tracks every async
        # generator it starts (a weak-set entry and a finalizer hook per response).
        self._chunks = self._inner.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        assert self._chunks is not None
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            self._error = exc
            raise

    def close(self) -> None:
        ex, self._ex = self._ex, None  # swap first: closing twice is a no-op
        if ex is None:
            return
        try:
            self._inner.close()
        finally:
            self._inner = _CLOSED
            _complete(self._door._ended(ex, self._route, self._error))

    async def aclose(self) -> None:
        ex, self._ex = self._ex, None
        if ex is None:
            return
        try:
            await self._inner.aclose()
        finally:
            self._inner, self._chunks = _CLOSED, None
            await self._door._ended(ex, self._route, self._error)


# ---------------------------------------------------------------------- sync


class PharoxTransport(_Door[httpx.HTTPTransport], httpx.BaseTransport):
    """`httpx.Client(transport=PharoxTransport(broker))`: a leased proxy per request.

    `max_moves`: how many other proxies a banned or failed request may move to (None:
    the broker's `max_moves`; bodies that cannot be replayed, such as generators,
    never move); `proxy_retries` is its deprecated name.  When every proxy tried
    bans, the caller gets the last ban answer (or `AllProxiesFailedError` with
    `raise_on_exhausted=True`); when every proxy tried fails, `AllProxiesFailedError`.
    `max_proxy_transports` bounds the per-proxy inner transports kept.  Other keyword
    arguments go to each inner `httpx.HTTPTransport` (`verify`, `http2`, `limits`, ...).
    """

    _inner = httpx.HTTPTransport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return _complete(self._exchange(request))

    def close(self) -> None:
        for transport in self._routes.drain():
            transport.close()

    # The I/O: blocking calls, so these coroutines never suspend.

    async def _lease(self, ex: Exchange) -> ProxyLease:
        return ex.lease()

    async def _send(self, transport: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        return transport.handle_request(request)

    async def _failed(self, ex: Exchange, exc: Exception) -> Step:
        return ex.failed(exc)

    async def _answered(self, ex: Exchange, response: httpx.Response) -> Step:
        return ex.answered(response.status_code, response, streaming=True)

    async def _close(self, ex: Exchange, error: BaseException | None) -> None:
        ex.close(error)

    async def _shut(self, response: httpx.Response) -> None:
        response.close()

    async def _close_idle(self, transport: httpx.HTTPTransport) -> None:
        CLOSER.start()  # ordinary code: the shared closer thread starts on first use
        CLOSER.put(transport.close)


# ---------------------------------------------------------------------- async


class AsyncPharoxTransport(_Door[httpx.AsyncHTTPTransport], httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=AsyncPharoxTransport(broker))`; see `PharoxTransport`.

    Never blocks the event loop: with a blocking (SQL) storage every broker call runs
    in a worker thread; inner transports share one SSL context built here, so no
    certificate bundle is loaded on the request path.  A cancelled request gives back
    whatever it held.
    """

    _inner = httpx.AsyncHTTPTransport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._exchange(request)

    async def aclose(self) -> None:
        for transport in self._routes.drain():
            await transport.aclose()

    # The I/O: awaited, the broker's calls off the loop when they could block it.  Plain
    # functions hand over the exchange's and httpx's own coroutines: no extra frame to
    # resume at every socket wait.

    def _lease(self, ex: Exchange) -> Awaitable[ProxyLease]:
        return ex.lease_async()

    def _send(self, transport: httpx.AsyncHTTPTransport, request: httpx.Request) -> Awaitable[httpx.Response]:
        return transport.handle_async_request(request)

    def _failed(self, ex: Exchange, exc: Exception) -> Awaitable[Step]:
        return ex.failed_async(exc)

    def _answered(self, ex: Exchange, response: httpx.Response) -> Awaitable[Step]:
        return ex.answered_async(response.status_code, response, streaming=True)

    async def _close(self, ex: Exchange, error: BaseException | None) -> None:
        if ex.close_may_block(error):  # in a worker thread it completes even if this task is cancelled
            await asyncio.to_thread(ex.close, error)
        else:
            ex.close(error)

    def _shut(self, response: httpx.Response) -> Awaitable[None]:
        return response.aclose()

    async def _close_idle(self, transport: httpx.AsyncHTTPTransport) -> None:
        try:
            await transport.aclose()
        except Exception as exc:  # an idle pool failing to close must not fail a request
            logger.debug("closing an evicted proxy transport: %(error)s", {"error": describe_error(exc)})
