"""httpx door: `PharoxTransport` / `AsyncPharoxTransport`, a leased proxy per request.

    client = httpx.Client(transport=PharoxTransport(broker))
    client = httpx.AsyncClient(transport=AsyncPharoxTransport(broker))

Each request leases a proxy, goes out through a per-proxy inner httpx transport (a
bounded LRU of them), is judged by the broker's policy, moves to another proxy on a
ban or a proxy failure (bounded by `proxy_retries`), and gives the proxy back when the
response stream is closed, never before.

The decisions live in one I/O-free generator (`_Door.exchange`) that yields what it
needs done (`_Acquire`, `_Send`, `_Judge`, `_Release`, `_Close`); the sync and async
transports only differ in how they carry those out.  Closing the response stream
ends the request with plain calls (`_Door.settle`: report, release), no generator:
it happens on every request and has no decision to share.  The async side never
blocks the event loop: a blocking storage (SQL) is called from a worker thread.

Per-request options go in `extensions={"pharox": {"pool": ..., "session": ...,
"filters": ProxyFilters(...)}}`; the response says which proxy served it in
`response.extensions["pharox"]` (no credentials).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar
from uuid import UUID

import httpx
from pharox import ProxyFilters, ProxyProtocol

from .attempts import ProxyAttempts, describe_error, is_dropped_connection
from .broker import HTTP_PROTOCOLS, LeaseBroker, ProxyLease
from .errors import (
    AllProxiesFailed,
    InvalidProxyURL,
    NoProxyAvailable,
    PharoxIntegrationError,
    ProxyAuthenticationFailed,
)
from .filters import with_protocols
from .health import Verdict

__all__ = [
    "SPOKEN_PROTOCOLS",
    "AllProxiesFailedError",
    "AsyncPharoxTransport",
    "InvalidProxyURLError",
    "NoProxyAvailableError",
    "PharoxTransport",
    "PharoxTransportError",
    "ProxyAuthenticationFailedError",
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
    """Every proxy tried was banned or failed; `.attempts` says what happened on each."""


class ProxyAuthenticationFailedError(ProxyAuthenticationFailed, AllProxiesFailedError):
    """The last proxy tried refused our credentials (HTTP 407 or SOCKS authentication)."""


class InvalidProxyURLError(InvalidProxyURL, PharoxTransportError):
    """httpx cannot use a leased proxy's URL."""


def _is_auth_failure(status_code: int | None, error: BaseException | None) -> bool:
    if status_code == 407:
        return True
    if isinstance(error, httpx.ProxyError):
        text = str(error).lower()
        # httpcore: "407 Proxy Authentication Required" (CONNECT), "Invalid
        # username/password" or "Requested ... but got USERNAME/PASSWORD" (SOCKS5).
        return text.startswith("407") or "username/password" in text
    return False


# ---------------------------------------------------------------------- routes

T = TypeVar("T", httpx.HTTPTransport, httpx.AsyncHTTPTransport)
T_co = TypeVar("T_co")


@dataclass(eq=False)
class _Route(Generic[T]):
    """One proxy's inner transport and how many requests or streams still use it."""

    transport: T
    active: int = 0
    evicted: bool = False


class _Routes(Generic[T]):
    """A bounded LRU of per-proxy inner transports; I/O-free, so both sides share it.

    With rotation over a large pool, one transport per proxy forever would grow
    without bound (requests' proxy-manager cache does).  Evicted transports are
    handed back for closing once no request or response stream still uses them.
    """

    def __init__(self, make: Callable[[httpx.Proxy], T], size: int) -> None:
        if size < 1:
            raise ValueError(f"max_proxy_transports={size!r}: expected an integer >= 1")
        self._make: Callable[[httpx.Proxy], T] = make
        self._size = size
        self._lock = threading.Lock()
        # Keyed by the proxy's URL with its credentials: a proxy whose address or
        # credentials changed gets a new route (the old one ages out), and a string
        # keeps its hash where a proxy id (a UUID) is hashed in Python at every lookup.
        self._routes: OrderedDict[str, _Route[T]] = OrderedDict()

    def checkout(self, lease: ProxyLease) -> tuple[_Route[T], Sequence[T]]:
        """The route for `lease` (one more user) and the transports now due for closing."""
        url = lease.url
        with self._lock:
            route = self._routes.get(url)
            if route is not None:
                self._routes.move_to_end(url)
                route.active += 1
                return route, ()
            route = self._routes[url] = _Route(self._make(_proxy_config(lease)), active=1)
            stale: list[T] = []
            while len(self._routes) > self._size:
                self._evict(next(iter(self._routes)), stale)
        return route, stale

    def checkin(self, route: _Route[T]) -> T | None:
        """One user less; returns the transport when it was evicted and is now idle."""
        with self._lock:
            route.active -= 1
            if route.evicted and route.active == 0:
                return route.transport
        return None

    def _evict(self, key: str, stale: list[T]) -> None:
        route = self._routes.pop(key)
        route.evicted = True
        if route.active == 0:
            stale.append(route.transport)

    def drain(self) -> list[T]:
        """Every transport, for closing the door."""
        with self._lock:
            out = [r.transport for r in self._routes.values()]
            self._routes.clear()
        return out

    def __len__(self) -> int:
        return len(self._routes)


def _proxy_config(lease: ProxyLease) -> httpx.Proxy:
    """httpx's proxy object, credentials kept apart from the URL (and masked in its repr)."""
    auth = (lease.username, lease.password or "") if lease.username is not None else None
    try:
        return httpx.Proxy(lease.safe_url, auth=auth)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidProxyURLError(f"httpx cannot use proxy {lease.safe_url}: {describe_error(exc)}") from None


# ---------------------------------------------------------------------- the shared logic

# What the logic asks the sync or async side to do.


@dataclass(slots=True)
class _Acquire:
    url: str | None
    pool: str | None
    filters: ProxyFilters | None  # the caller's, for explanations
    effective: ProxyFilters | None  # with the protocols httpx speaks
    session: str | None
    avoid: Collection[UUID] = ()  # proxies this request already tried


@dataclass(slots=True)
class _Send:
    transport: httpx.HTTPTransport | httpx.AsyncHTTPTransport
    request: httpx.Request


@dataclass
class _Judge:
    attempts: ProxyAttempts
    lease: ProxyLease
    kwargs: dict[str, Any]


@dataclass
class _Release:
    lease: ProxyLease


@dataclass
class _Close:
    transports: Sequence[Any] = ()
    response: httpx.Response | None = None


_Op = _Acquire | _Send | _Judge | _Release | _Close


@dataclass(slots=True)
class _Ticket:
    """What the response stream needs to finish its request when it is closed."""

    lease: ProxyLease
    route: _Route[Any]
    status_code: int
    verdict: Verdict
    latency_ms: float


class _Door(Generic[T]):
    """The request life cycle as generators of `_Op`s, shared by both transports."""

    def __init__(
        self,
        broker: LeaseBroker,
        routes: _Routes[T],
        *,
        pool: str | None,
        filters: ProxyFilters | None,
        proxy_retries: int,
        raise_on_exhausted: bool,
    ) -> None:
        if proxy_retries < 0:
            raise ValueError(f"proxy_retries={proxy_retries!r}: expected an integer >= 0")
        self.broker = broker
        self.routes: _Routes[T] = routes
        self.pool = pool
        self.filters = filters
        # Built once: a per-request protocol filter would cost a pydantic model each time.
        self._effective = with_protocols(filters, SPOKEN_PROTOCOLS)
        self._default = _Acquire(None, pool, filters, self._effective, None)
        self.proxy_retries = proxy_retries
        self.raise_on_exhausted = raise_on_exhausted

    def _options(self, request: httpx.Request) -> _Acquire:
        # The target URL is not passed on: the broker does not use it, and making it a
        # string (without user info) cost more than a tenth of the lease.
        extra = request.extensions.get(_EXTENSION)
        if not extra:  # the common case: the transport's own options (shared, never changed)
            return self._default
        if not isinstance(extra, dict):
            raise TypeError(f'extensions["{_EXTENSION}"] must be a dict (pool, session, filters)')
        unknown = set(extra) - {"pool", "session", "filters"}
        if unknown:
            raise ValueError(
                f'extensions["{_EXTENSION}"]: unknown keys {sorted(unknown)}; known: pool, session, filters'
            )
        filters = extra.get("filters", self.filters)
        return _Acquire(
            url=None,
            pool=extra.get("pool", self.pool),
            filters=filters,
            effective=self._effective if filters is self.filters else with_protocols(filters, SPOKEN_PROTOCOLS),
            session=extra.get("session"),
        )

    def acquire(self, op: _Acquire) -> ProxyLease:
        """Lease for `op` (blocking form; the async side runs its own)."""
        try:
            return self.broker.acquire(op.url, pool=op.pool, filters=op.effective, session=op.session, avoid=op.avoid)
        except NoProxyAvailable:
            raise self.explain(op) from None

    def explain(self, op: _Acquire) -> NoProxyAvailable:
        """Why nothing could be leased, told with the caller's filters and httpx's protocols."""
        return self.broker.explain(op.pool, op.filters, SPOKEN_PROTOCOLS)

    def exchange(self, request: httpx.Request) -> Generator[_Op, Any, httpx.Response]:
        """Lease, send, judge, move or hand the response (and the lease) to its stream."""
        try:
            acquire = self._options(request)
        except (TypeError, ValueError) as exc:
            raise PharoxTransportError(str(exc), request=request) from None
        # A caller's Proxy-Authorization would ride the tunnel to the target (or reach
        # the wrong proxy): the proxy's own credentials are added by the inner transport.
        if "proxy-authorization" in request.headers:
            del request.headers["proxy-authorization"]
        # Built when a proxy is first judged here (an error or a ban): most requests never are.
        attempts: ProxyAttempts | None = None
        replayable = isinstance(request.stream, httpx.ByteStream)  # bodies of bytes replay
        lease: ProxyLease | None = None
        last: tuple[int | None, BaseException | None] = (None, None)  # for the final error
        try:
            while True:
                if attempts is not None and acquire.avoid is not attempts.tried:
                    acquire = replace(acquire, avoid=attempts.tried)  # a move skips the proxies tried
                try:
                    lease = yield acquire
                except NoProxyAvailable as exc:
                    if attempts is not None:  # moving, and nothing left to move to
                        raise self._exhausted(attempts, request, *last, pool_state=str(exc)) from exc
                    raise _no_proxy(exc, request) from exc
                assert lease is not None
                try:
                    route, stale = self.routes.checkout(lease)
                except InvalidProxyURLError as exc:
                    exc.request = request
                    raise
                held: _Route[T] | None = route  # checked in again on every way out until a stream owns it
                answer: httpx.Response | None = None  # closed on those ways out
                try:
                    if stale:  # closing them may be cancelled: the route still goes back
                        yield _Close(transports=stale)
                    try:
                        try:
                            response: httpx.Response = yield _Send(route.transport, request)
                        except Exception as exc:
                            # A kept-alive connection the proxy closed before answering is sent
                            # once more (httpcore takes another) before it counts against the proxy.
                            if not (replayable and is_dropped_connection(exc)):
                                raise
                            response = yield _Send(route.transport, request)
                        answer = response
                    except Exception as exc:
                        held = None
                        yield from self._hand_back(route, None)
                        attempts = attempts or ProxyAttempts(self.broker, self.proxy_retries)
                        verdict = yield _Judge(attempts, lease, {"error": exc})
                        yield _Release(lease)
                        lease = None
                        last = (None, exc)
                        if replayable and attempts.should_move(verdict):
                            continue
                        if verdict.moves_request:
                            raise self._exhausted(attempts, request, None, exc) from exc
                        raise
                    latency_ms = lease.elapsed_ms()
                    # A ban detector may raise, a ban report may fail in the storage: the
                    # answer is closed and the route checked in below, the lease released
                    # by the outer handler.
                    verdict = self.broker.policy.judge(response.status_code, None, response)
                    if verdict.moves_request:
                        # Judged now (the move depends on it); an answer kept for the
                        # caller is judged when its stream closes, with any read error.
                        attempts = attempts or ProxyAttempts(self.broker, self.proxy_retries)
                        yield _Judge(
                            attempts,
                            lease,
                            {"status_code": response.status_code, "response": response, "latency_ms": latency_ms},
                        )
                        can_move = replayable and attempts.should_move(verdict)
                        last = (response.status_code, None)
                        if can_move or self.raise_on_exhausted:
                            held = None
                            yield from self._hand_back(route, response)
                            yield _Release(lease)
                            lease = None
                            if can_move:
                                continue
                            raise self._exhausted(attempts, request, response.status_code, None)
                    ticket = _Ticket(lease, route, response.status_code, verdict, latency_ms)
                    # The response's own dict (httpcore makes one per response): set, not copied.
                    response.extensions[_EXTENSION] = {
                        "proxy": lease.safe_url,
                        "attempts": [] if attempts is None else [str(a) for a in attempts.attempts],
                    }
                    response.stream = self._bind(response.stream, ticket)
                    lease = held = None  # the stream owns them now
                    return response
                except BaseException:
                    if held is not None:
                        yield from self._hand_back(held, answer)
                    raise
        except GeneratorExit:
            raise
        except BaseException as exc:
            if lease is not None and not lease.released:
                yield _Release(lease)
            if isinstance(exc, Exception) and not isinstance(exc, httpx.HTTPError):
                # Whatever the transports raise is an httpx error (a storage or a ban
                # detector failing included), so `except httpx.HTTPError` code holds.
                raise PharoxTransportError(describe_error(exc), request=request) from exc
            raise

    def _hand_back(self, route: _Route[T], answer: httpx.Response | None) -> Generator[_Op, Any, None]:
        """One user less on `route`; close `answer` and the route's transport if it was
        evicted meanwhile and is now idle."""
        idle = self.routes.checkin(route)
        if idle is not None or answer is not None:
            yield _Close(transports=() if idle is None else (idle,), response=answer)

    def settle(self, ticket: _Ticket, error: BaseException | None) -> BaseException | None:
        """The response stream was closed: judge the request, give the proxy back.

        Plain calls, no I/O of the door's own: the async side runs them in one worker
        thread hop when the storage blocks (and the release still completes if the
        awaiting task is cancelled).  Returns a report failure for the caller to raise.
        """
        lease = ticket.lease
        try:
            if lease.reported:
                self.broker.release(lease)
            # Reported straight to the broker: the request's attempts were already
            # published in the response's extensions and nothing reads them after.
            elif error is not None:
                self.broker.finish(lease, error=error, latency_ms=ticket.latency_ms)
            else:
                self.broker.finish(lease, ticket.status_code, latency_ms=ticket.latency_ms, verdict=ticket.verdict)
        except Exception as exc:  # the proxy went back all the same (`finish`); the caller hears of it
            return exc
        return None

    def _exhausted(
        self,
        attempts: ProxyAttempts,
        request: httpx.Request,
        status_code: int | None,
        error: BaseException | None,
        *,
        pool_state: str | None = None,
    ) -> AllProxiesFailedError:
        cls = ProxyAuthenticationFailedError if _is_auth_failure(status_code, error) else AllProxiesFailedError
        failure = attempts.failure(cls)
        assert isinstance(failure, AllProxiesFailedError)
        if pool_state is not None:  # the request wanted to move on but the pool had nothing left
            failure = cls(attempts.attempts, f"{failure}; no other proxy to move to: {pool_state}")
        failure.request = request
        return failure

    def _bind(self, stream: Any, ticket: _Ticket) -> httpx.SyncByteStream | httpx.AsyncByteStream:
        raise NotImplementedError


def _no_proxy(exc: NoProxyAvailable, request: httpx.Request) -> NoProxyAvailableError:
    error = NoProxyAvailableError(
        str(exc), pool=exc.pool, filters=exc.filters, counts=exc.counts, next_revival_in=exc.next_revival_in
    )
    error.request = request
    return error


# ---------------------------------------------------------------------- sync


class _SyncDoor(_Door[httpx.HTTPTransport]):
    def _bind(self, stream: Any, ticket: _Ticket) -> httpx.SyncByteStream:
        return _LeasedStream(stream, self, ticket)

    def run(self, steps: Generator[_Op, Any, T_co]) -> T_co:
        """Carry out the logic's requests with blocking calls."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            value, error = None, None
            try:
                value = self._do(op)
            except BaseException as exc:
                error = exc

    def _do(self, op: _Op) -> Any:
        broker = self.broker
        if isinstance(op, _Acquire):
            return self.acquire(op)
        if isinstance(op, _Send):
            assert isinstance(op.transport, httpx.HTTPTransport)
            return op.transport.handle_request(op.request)
        if isinstance(op, _Judge):
            return op.attempts.judge(op.lease, **op.kwargs)
        if isinstance(op, _Release):
            return broker.release(op.lease)
        try:
            if op.response is not None:
                op.response.close()
        finally:  # an answer that fails to close still lets the idle transports close
            self.close_transports(op.transports)
        return None

    def close_transports(self, transports: Sequence[httpx.HTTPTransport]) -> None:
        for transport in transports:
            try:
                transport.close()
            except Exception as exc:  # an idle pool failing to close must not fail a request
                logger.debug("closing an evicted proxy transport: %(error)s", {"error": describe_error(exc)})


class _LeasedStream(httpx.SyncByteStream):
    """The inner response stream; closing it finishes the request and releases the lease."""

    def __init__(self, inner: httpx.SyncByteStream, door: _SyncDoor, ticket: _Ticket) -> None:
        self._inner = inner
        self._door = door
        self._ticket: _Ticket | None = ticket
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except Exception as exc:
            self._error = exc
            raise

    def close(self) -> None:
        ticket, self._ticket = self._ticket, None  # swap first: closing twice is a no-op
        if ticket is None:
            return
        try:
            self._inner.close()
        finally:
            self._inner = _CLOSED
            door = self._door
            idle = door.routes.checkin(ticket.route)
            failure = door.settle(ticket, self._error)
            if idle is not None:
                door.close_transports([idle])
            if failure is not None:
                raise PharoxTransportError(f"could not report the request: {describe_error(failure)}") from failure


class PharoxTransport(httpx.BaseTransport):
    """`httpx.Client(transport=PharoxTransport(broker))`: a leased proxy per request.

    `proxy_retries`: how many other proxies a banned or failed request moves to (bodies
    that cannot be replayed, such as generators, never move).  `raise_on_exhausted`:
    when the last proxy is banned, raise `AllProxiesFailedError` (default) or return
    its answer.  `max_proxy_transports` bounds the per-proxy inner transports kept.
    Other keyword arguments go to each inner `httpx.HTTPTransport` (`verify`, `http2`,
    `limits`, `retries`, ...).
    """

    def __init__(
        self,
        broker: LeaseBroker,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        proxy_retries: int = 3,
        raise_on_exhausted: bool = True,
        max_proxy_transports: int = _DEFAULT_MAX_TRANSPORTS,
        **transport_kwargs: Any,
    ) -> None:
        make = _transport_factory(httpx.HTTPTransport, transport_kwargs)
        self._door = _SyncDoor(
            broker,
            _Routes(make, max_proxy_transports),
            pool=pool,
            filters=filters,
            proxy_retries=proxy_retries,
            raise_on_exhausted=raise_on_exhausted,
        )
        self.broker = broker

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._door.run(self._door.exchange(request))

    @property
    def proxy_transports(self) -> int:
        """How many per-proxy inner transports are open."""
        return len(self._door.routes)

    def close(self) -> None:
        for transport in self._door.routes.drain():
            transport.close()

    def __repr__(self) -> str:
        return f"<PharoxTransport pool={self._door.pool or self.broker.pool!r} proxies_open={self.proxy_transports}>"


# ---------------------------------------------------------------------- async


class _AsyncDoor(_Door[httpx.AsyncHTTPTransport]):
    def _bind(self, stream: Any, ticket: _Ticket) -> httpx.AsyncByteStream:
        return _AsyncLeasedStream(stream, self, ticket)

    async def run(self, steps: Generator[_Op, Any, T_co]) -> T_co:
        """Carry out the logic's requests without blocking the event loop."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            value, error = None, None
            try:
                # The two steps of every request are awaited here, not through `_do`:
                # each coroutine level is resumed again at every socket wait.
                if type(op) is _Send:
                    value = await op.transport.handle_async_request(op.request)  # type: ignore[union-attr]
                elif type(op) is _Acquire:
                    value = self._acquire_now(op) or await self._acquire(op)
                else:
                    value = await self._do(op)
            except BaseException as exc:
                error = exc

    async def _do(self, op: _Op) -> Any:
        broker = self.broker
        if isinstance(op, _Acquire):
            return await self._acquire(op)
        if isinstance(op, _Send):
            assert isinstance(op.transport, httpx.AsyncHTTPTransport)
            return await op.transport.handle_async_request(op.request)
        if isinstance(op, _Judge):
            if broker.storage_blocks:
                return await asyncio.to_thread(lambda: op.attempts.judge(op.lease, **op.kwargs))
            return op.attempts.judge(op.lease, **op.kwargs)
        if isinstance(op, _Release):
            if broker.storage_blocks:
                # In a worker thread the release completes even if this task is cancelled.
                return await asyncio.to_thread(broker.release, op.lease)
            return broker.release(op.lease)
        try:
            if op.response is not None:
                await op.response.aclose()
        finally:  # an answer that fails to close still lets the idle transports close
            await self.close_transports(op.transports)
        return None

    async def close_transports(self, transports: Sequence[httpx.AsyncHTTPTransport]) -> None:
        for transport in transports:
            try:
                await transport.aclose()
            except Exception as exc:  # an idle pool failing to close must not fail a request
                logger.debug("closing an evicted proxy transport: %(error)s", {"error": describe_error(exc)})

    def _acquire_now(self, op: _Acquire) -> ProxyLease | None:
        """The common lease taken inline (a memory storage answers at once); None: await it."""
        if op.session is not None or op.avoid or self.broker.storage_blocks:
            return None
        return self.broker.acquire_nowait(pool=op.pool, filters=op.effective)

    async def _acquire(self, op: _Acquire) -> ProxyLease:
        broker = self.broker
        pending = broker.acquire_async(op.url, pool=op.pool, filters=op.effective, session=op.session, avoid=op.avoid)
        try:
            if not broker.storage_blocks:
                return await pending  # cancellable only while waiting, when nothing is held
            # A worker thread may finish leasing after this task was cancelled: let the
            # acquisition finish on its own and give back what it got.
            task = asyncio.ensure_future(pending)
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(self._release_orphan)
                raise
        except NoProxyAvailable:
            if broker.storage_blocks:
                raise await asyncio.to_thread(self.explain, op) from None
            raise self.explain(op) from None

    def _release_orphan(self, task: asyncio.Future[ProxyLease]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        lease = task.result()
        asyncio.get_running_loop().run_in_executor(None, self.broker.release, lease)


class _AsyncLeasedStream(httpx.AsyncByteStream):
    """Async twin of `_LeasedStream`: `aclose()` finishes the request and releases."""

    def __init__(self, inner: httpx.AsyncByteStream, door: _AsyncDoor, ticket: _Ticket) -> None:
        self._inner = inner
        self._door = door
        self._ticket: _Ticket | None = ticket
        self._error: BaseException | None = None
        self._chunks: AsyncIterator[bytes] | None = None

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

    async def aclose(self) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return
        try:
            await self._inner.aclose()
        finally:
            self._inner, self._chunks = _CLOSED, None
            door = self._door
            idle = door.routes.checkin(ticket.route)
            if door.broker.storage_blocks:
                failure = await asyncio.to_thread(door.settle, ticket, self._error)
            else:
                failure = door.settle(ticket, self._error)
            if idle is not None:
                await door.close_transports([idle])
            if failure is not None:
                raise PharoxTransportError(f"could not report the request: {describe_error(failure)}") from failure


class AsyncPharoxTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=AsyncPharoxTransport(broker))`; see `PharoxTransport`.

    Never blocks the event loop: with a blocking (SQL) storage every broker call runs
    in a worker thread; inner transports share one SSL context built here, so no
    certificate bundle is loaded on the request path.
    """

    def __init__(
        self,
        broker: LeaseBroker,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        proxy_retries: int = 3,
        raise_on_exhausted: bool = True,
        max_proxy_transports: int = _DEFAULT_MAX_TRANSPORTS,
        **transport_kwargs: Any,
    ) -> None:
        make = _transport_factory(httpx.AsyncHTTPTransport, transport_kwargs)
        self._door = _AsyncDoor(
            broker,
            _Routes(make, max_proxy_transports),
            pool=pool,
            filters=filters,
            proxy_retries=proxy_retries,
            raise_on_exhausted=raise_on_exhausted,
        )
        self.broker = broker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._door.run(self._door.exchange(request))

    @property
    def proxy_transports(self) -> int:
        return len(self._door.routes)

    async def aclose(self) -> None:
        for transport in self._door.routes.drain():
            await transport.aclose()

    def __repr__(self) -> str:
        pool = self._door.pool or self.broker.pool
        return f"<AsyncPharoxTransport pool={pool!r} proxies_open={self.proxy_transports}>"


def _transport_factory(cls: Callable[..., T], kwargs: dict[str, Any]) -> Callable[[httpx.Proxy], T]:
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

    def make(proxy: httpx.Proxy) -> T:
        if proxy.url.scheme == "https" and proxy.ssl_context is None:
            proxy.ssl_context = context  # TLS to the proxy itself: no bundle load per transport
        return cls(verify=context, trust_env=trust_env, proxy=proxy, **options)

    return make
