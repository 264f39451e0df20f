"""The life of one request, decided once for every door.

A door opens an `Exchange` per request and drives it:

    exchange = broker.exchange(url, body=body, timeout=connect_timeout, errors=DOOR_ERRORS)
    try:
        while True:
            lease = exchange.lease()              # NoProxyAvailable (the door's type) if none
            ... send through lease ...
            step = exchange.answered(status, response)   # or exchange.failed(error)
            if step is Step.RETURN: return response
            if step is Step.RAISE: raise exchange.error
            # RESEND: same lease, fresh connection; MOVE: discard the answer, loop
    finally:
        exchange.close()                          # releases whatever is still held

The door never decides: which outcome moves the request, how many moves it gets, whether
the body may be sent again, which error the caller sees and when a lease goes back are
all here.  The send stays with the door (Scrapy moves a request by yielding a new
`Request`), so this is a step API, not a loop.

| outcome                                | health                    | step                       |
|----------------------------------------|---------------------------|----------------------------|
| answer the site meant (2xx-5xx)        | success for the proxy     | RETURN                     |
| ban (ban codes, ban detector)          | ban for (proxy, site)     | MOVE if possible, else RETURN the ban answer |
| 429, 503 with Retry-After              | cool-down for (proxy, site), no strike | as a ban      |
| proxy failure (connect, tunnel, 407)   | failure, proxy-wide       | MOVE if possible, else RAISE AllProxiesFailed |
| dropped kept-alive connection          | none                      | RESEND once per proxy      |
| the caller's own error (bad URL...)    | none against the proxy    | RAISE it as it is          |

"MOVE if possible" means: moves left, a body that can be sent again, and another proxy
not yet tried by this request leased now (it is held for the next `lease()`).
"""

from __future__ import annotations

import io
import logging
import re
import ssl
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import Enum
from http.client import RemoteDisconnected
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pharox import ProxyFilters, ProxyProtocol

from . import bridge
from .errors import (
    AllProxiesFailed,
    NoProxyAvailable,
    ProxyAttempt,
    ProxyAuthenticationFailed,
    ReportFailed,
)
from .health import Verdict

if TYPE_CHECKING:
    from .broker import LeaseBroker
    from .lease import ProxyLease

logger = logging.getLogger("pharox_integrations")

#: How many other proxies a request may move to when not told otherwise: 4 proxies
#: in all, enough to get past a few banned or dead ones without one request
#: sweeping a large part of a small pool.
DEFAULT_MAX_MOVES = 3


class Step(str, Enum):
    """What the door does next."""

    RETURN = "return"  # hand the answer to the caller
    RESEND = "resend"  # send again through the same proxy on a fresh connection
    MOVE = "move"  # drop the answer, send through `exchange.lease()` (another proxy)
    RAISE = "raise"  # raise `exchange.error`


@dataclass(frozen=True)
class DoorErrors:
    """The exception classes a door raises: the core's, also of the client's own family."""

    no_proxy: type[NoProxyAvailable] = NoProxyAvailable
    all_failed: type[AllProxiesFailed] = AllProxiesFailed
    auth_failed: type[AllProxiesFailed] = ProxyAuthenticationFailed
    report_failed: type[ReportFailed] = ReportFailed


CORE_ERRORS = DoorErrors()


class Exchange:
    """One request's trip through the pool: its leases, its moves, its final answer.

    Not thread-safe: one request is driven by one thread or task at a time.
    """

    __slots__ = (
        "_body",
        "_deferred",
        "_next",
        "_none_left",
        "_position",
        "_resent",
        "_tried",
        "attempts",
        "broker",
        "current",
        "error",
        "errors",
        "filters",
        "moves_left",
        "pool",
        "protocols",
        "replayable",
        "session",
        "site",
        "timeout",
        "url",
    )

    def __init__(
        self,
        broker: LeaseBroker,
        url: str | None = None,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        session: str | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
        max_moves: int | None = None,
        body: Any = None,
        timeout: float | None = None,
        host: str | None = None,
        errors: DoorErrors = CORE_ERRORS,
    ) -> None:
        moves = broker.max_moves if max_moves is None else max_moves
        if not isinstance(moves, int) or moves < 0:
            raise ValueError(f"max_moves={moves!r}: expected an integer >= 0")
        self.broker = broker
        self.url = url
        # Whose bans, cool-downs and spacing apply: the site of the URL (or of the host).
        self.site = broker.sites.site_of(url) if host is None else broker.sites.site_of_name(host)
        self.pool = pool
        self.filters = filters
        self.session = session
        self.protocols = protocols
        self.moves_left = moves
        self.timeout = timeout
        self.errors = errors
        self._body = body
        self.replayable, self._position = _replay_rule(body)
        self.current: ProxyLease | None = None  # the lease being sent through
        self._next: ProxyLease | None = None  # leased for a move, not yet handed out
        self._tried: set[UUID] | None = None
        self._resent = False
        self._deferred: tuple[int | None, Verdict, float] | None = None
        self._none_left = ""  # why a wanted move found no proxy, for the final error
        self.attempts: list[ProxyAttempt] = []  # each proxy judged against, in order
        self.error: BaseException | None = None  # what to raise on Step.RAISE

    # ------------------------------------------------------------------ leasing

    def lease(self) -> ProxyLease:
        """The lease to send through: the first one, or the one a MOVE prepared."""
        if self._next is not None:
            self.current, self._next = self._next, None
            self._resent = False
            return self.current
        try:
            self.current = self.broker.acquire(self.url, timeout=self._wait_limit(), **self._choices())
        except NoProxyAvailable as exc:
            raise self._no_proxy(exc) from None
        return self.current

    async def lease_async(self, waiter: bridge.Waiter = bridge.ASYNCIO) -> ProxyLease:
        """`lease()` for an event loop (asyncio's unless `waiter` says): waits without
        blocking the loop."""
        if self._next is not None:
            return self.lease()
        try:
            self.current = await self.broker.acquire_async(
                self.url, timeout=self._wait_limit(), waiter=waiter, **self._choices()
            )
        except NoProxyAvailable as exc:
            raise self._no_proxy(exc) from None
        return self.current

    def _choices(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "filters": self.filters,
            "session": self.session,
            "protocols": self.protocols,
            "site": self.site,
        }

    def _wait_limit(self) -> float:
        """How long a lease may be waited for: the caller's timeout, capped by the broker's."""
        limit = self.broker.acquire_timeout
        return limit if self.timeout is None else min(limit, max(0.0, self.timeout))

    def _no_proxy(self, exc: NoProxyAvailable) -> NoProxyAvailable:
        cls = self.errors.no_proxy
        if type(exc) is cls:
            return exc
        return cls(
            str(exc),
            pool=exc.pool,
            filters=exc.filters,
            counts=exc.counts,
            next_revival_in=exc.next_revival_in,
            site=exc.site,
            next_usable_in=exc.next_usable_in,
        )

    # ------------------------------------------------------------------ outcomes

    def answered(
        self,
        status_code: int,
        response: Any = None,
        *,
        latency_ms: float | None = None,
        verdict: Verdict | None = None,
        streaming: bool = False,
    ) -> Step:
        """The proxy delivered an answer: RETURN it, or MOVE (the answer is dropped).

        `streaming`: the caller reads the body later; the lease is held until `close()`
        (a success is then reported with any read error, see `close`).
        """
        lease = self._held()
        if verdict is None:
            verdict = self.judge(status_code, response)
        if latency_ms is None:
            latency_ms = lease.elapsed_ms()
        if not verdict.moves_request:
            if streaming:
                self._deferred = (status_code, verdict, latency_ms)
            else:
                self._finish(lease, f"HTTP {status_code}", status_code=status_code, verdict=verdict, latency=latency_ms)
            return Step.RETURN
        self._finish(
            lease, f"HTTP {status_code}", status_code=status_code, verdict=verdict, latency=latency_ms,
            response=response, keep=streaming,
        )
        self._note(lease, verdict, f"HTTP {status_code}")
        if self._prepare_move(lease, verdict, f"HTTP {status_code}"):
            if streaming:
                self.broker.release(lease)
            return Step.MOVE
        if verdict.site_refusal:
            return Step.RETURN  # the caller gets the site's last word
        self.broker.release(lease)
        self.error = self._give_up(status_code=status_code)
        return Step.RAISE

    def failed(self, error: BaseException, *, status_code: int | None = None, verdict: Verdict | None = None) -> Step:
        """Sending failed (no answer from the site): RESEND, MOVE or RAISE.

        `status_code`: what the proxy itself answered, such as a refused CONNECT (407).
        """
        lease = self._held()
        if status_code is None and verdict is None and not self._resent and self.replayable and is_dropped(error):
            self._resent = True  # a kept-alive connection the proxy had closed: once more, same proxy
            self._rewind()
            return Step.RESEND
        detail = f"HTTP {status_code}" if status_code is not None else describe_error(error)
        if verdict is None:
            verdict = self._judged(detail, status_code, None if status_code else error, None)
            if status_code is not None and verdict is not Verdict.FAILURE:
                verdict = Verdict.FAILURE  # the proxy, not the site, refused the tunnel
        self._finish(lease, detail, status_code=status_code, error=error, verdict=verdict, latency=None)
        if not verdict.moves_request:
            self.error = error  # the caller's or the site's doing: as it is
            return Step.RAISE
        self._note(lease, verdict, detail)
        if self._prepare_move(lease, verdict, detail):
            return Step.MOVE
        self.error = self._give_up(status_code=status_code, cause=error)
        return Step.RAISE

    async def answered_async(
        self,
        status_code: int,
        response: Any = None,
        *,
        verdict: Verdict | None = None,
        waiter: bridge.Waiter = bridge.ASYNCIO,
        **kwargs: Any,
    ) -> Step:
        """`answered` without blocking the loop: judged inline; the storage write and a
        move's lease go to a worker thread only when they may block or wait."""
        if verdict is None:
            verdict = self.judge(status_code, response)
        if self.may_block(verdict, streaming=kwargs.get("streaming", False)):
            return await self._off_loop(waiter, self.answered, status_code, response, verdict=verdict, **kwargs)
        return self.answered(status_code, response, verdict=verdict, **kwargs)

    def may_block(self, verdict: Verdict | None = None, *, streaming: bool = False) -> bool:
        """Whether settling this outcome may block: a write to a storage that does I/O,
        or a move that leases (and may wait).  Event loops settle the others inline.

        `verdict` None: a failure, not yet judged.  An answer that does not move and
        whose body is still to be read writes nothing yet (see `close`)."""
        if verdict is not None and not verdict.moves_request:
            return self.broker.storage_blocks and not streaming and not self.broker.quiet(self._held(), verdict)
        return self.broker.storage_blocks or (self.moves_left > 0 and self.replayable)

    def close_may_block(self, error: BaseException | None = None) -> bool:
        """Whether `close(error)` may block (see `may_block`): a streamed routine answer
        on a lease-block slot is settled inline."""
        if not self.broker.storage_blocks:
            return False
        lease, deferred = self.current, self._deferred
        if lease is None or lease.released:
            return self._next is not None
        return error is not None or deferred is None or not self.broker.quiet(lease, deferred[1])

    async def failed_async(self, error: BaseException, waiter: bridge.Waiter = bridge.ASYNCIO, **kwargs: Any) -> Step:
        """`failed` without blocking the loop (a failure may move, and a move may wait)."""
        if self.may_block():
            return await self._off_loop(waiter, self.failed, error, **kwargs)
        return self.failed(error, **kwargs)

    async def _off_loop(self, waiter: bridge.Waiter, fn: Any, *args: Any, **kwargs: Any) -> Step:
        """`fn` in a worker thread; cancelled meanwhile, whatever the exchange holds is
        released by that thread (the loop may be gone by then)."""
        step: Step = await waiter.in_thread(lambda: fn(*args, **kwargs), lambda _: self.close())
        return step

    def judge(self, status_code: int, response: Any = None) -> Verdict:
        """The policy's verdict on an answer (a failing ban detector: `ReportFailed`, released)."""
        return self._judged(f"HTTP {status_code}", status_code, None, response)

    def _judged(self, detail: str, status_code: int | None, error: BaseException | None, response: Any) -> Verdict:
        lease = self._held()
        try:
            return self.broker.policy.judge(status_code, error, response)  # a ban detector may raise
        except Exception as exc:
            self.close()
            raise self._report_failed(lease, detail, exc) from exc

    # ------------------------------------------------------------------ the end

    def close(self, error: BaseException | None = None) -> None:
        """Release every lease still held (idempotent); a streamed answer's body is done.

        `error`: reading the streamed body failed; judged against the proxy as a failure.
        """
        lease, self.current = self.current, None
        spare, self._next = self._next, None
        if spare is not None:
            self.broker.release(spare)
        if lease is None or lease.released:
            return
        deferred, self._deferred = self._deferred, None
        try:
            if error is not None and deferred is not None:
                self.broker.finish(lease, error=error, latency_ms=deferred[2])
            elif deferred is not None:
                self.broker.finish(lease, deferred[0], latency_ms=deferred[2], verdict=deferred[1])
        except Exception as exc:
            raise self._report_failed(lease, f"HTTP {deferred[0]}" if deferred else "", exc) from exc
        finally:
            self.broker.release(lease)

    @property
    def tried(self) -> Collection[UUID]:
        return self._tried or ()

    # ------------------------------------------------------------------ inside

    def _held(self) -> ProxyLease:
        if self.current is None:
            raise RuntimeError("Exchange: no lease is being sent through (call lease() first)")
        return self.current

    def _finish(
        self,
        lease: ProxyLease,
        detail: str,
        *,
        status_code: int | None,
        verdict: Verdict,
        latency: float | None,
        error: BaseException | None = None,
        response: Any = None,
        keep: bool = False,
    ) -> None:
        """Report the outcome and (unless `keep`) release: the lease goes back even when the
        report fails, and the failure reaches the caller as one error type."""
        try:
            report = self.broker.report if keep else self.broker.finish
            report(lease, status_code, error, latency, response=response, verdict=verdict)
        except Exception as exc:
            self.close()
            raise self._report_failed(lease, detail, exc) from exc
        if not keep:
            self.current = None

    def _note(self, lease: ProxyLease, verdict: Verdict, detail: str) -> None:
        if self._tried is None:
            self._tried = set()
        self._tried.add(lease.proxy_id)
        self.attempts.append(ProxyAttempt(lease.safe_url, verdict.value, detail))

    def _prepare_move(self, lease: ProxyLease, verdict: Verdict, detail: str) -> bool:
        """Lease another proxy for a move, when the rules allow one."""
        if self.moves_left <= 0 or not self.replayable:
            return False
        try:
            self._next = self.broker.acquire(
                self.url, timeout=self._wait_limit(), avoid=self._tried or (), **self._choices()
            )
        except NoProxyAvailable as exc:
            self._none_left = str(exc)
            return False
        self.moves_left -= 1
        self._rewind()
        logger.info(
            "proxy %(proxy)s: %(outcome)s (%(detail)s); moving the request to another proxy (%(left)d moves left)",
            {"proxy": lease.safe_url, "outcome": verdict.value, "detail": detail, "left": self.moves_left},
        )
        return True

    def failure(self) -> AllProxiesFailed:
        """The error naming every proxy tried so far (for callers that want to raise on a
        returned ban, such as httpx's `raise_on_exhausted`)."""
        return self._give_up()

    def _give_up(self, *, status_code: int | None = None, cause: BaseException | None = None) -> AllProxiesFailed:
        auth = status_code == 407 or (cause is not None and is_auth_refusal(cause))
        cls = self.errors.auth_failed if auth else self.errors.all_failed
        tried = "; ".join(str(a) for a in self.attempts)
        n = len(self.attempts)
        message = f"{'the only proxy' if n == 1 else f'all {n} proxies'} tried failed: {tried}"
        if not self.replayable and self.moves_left > 0:
            message += "; the request body could not be replayed on another proxy"
        elif self._none_left:
            message += f"; no other proxy to move to: {self._none_left}"
        return cls(self.attempts, message)

    def _report_failed(self, lease: ProxyLease, detail: str, exc: Exception) -> Exception:
        if isinstance(exc, self.errors.report_failed):
            return exc
        return self.errors.report_failed(
            f"proxy {lease.safe_url}: judging or recording its outcome ({mask_credentials(detail)}) "
            f"failed: {describe_error(exc)}"
        )

    def _rewind(self) -> None:
        if self._position is not None:
            self._body.seek(self._position)


# ---------------------------------------------------------------------- rules


def moves_keyword(max_moves: int | None, **old: int | None) -> int | None:
    """A door's `max_moves=`, or its old name (accepted with a DeprecationWarning)."""
    for name, value in old.items():
        if value is None:
            continue
        if max_moves is not None:
            raise ValueError(f"{name}= and max_moves= are both given: keep max_moves= only")
        warnings.warn(f"{name}= is deprecated: use max_moves= (the same meaning in every door)", DeprecationWarning, 3)
        max_moves = value
    if max_moves is not None and (not isinstance(max_moves, int) or max_moves < 0):
        raise ValueError(f"max_moves={max_moves!r}: expected an integer >= 0")
    return max_moves


def _replay_rule(body: Any) -> tuple[bool, int | None]:
    """(can the body be sent again, where to rewind it to).

    Bytes and text replay as they are; a seekable stream is rewound to where it stood
    when the request began (as requests' redirects and urllib3's `body_pos` do);
    generators, iterators and other streams are read once and never sent twice.
    """
    if body is None or isinstance(body, (bytes, bytearray, str, memoryview)):
        return True, None
    seekable = getattr(body, "seekable", None)
    tell = getattr(body, "tell", None)
    if callable(tell) and getattr(body, "seek", None) is not None:
        try:
            if callable(seekable) and not seekable():
                return False, None
            return True, int(tell())
        except (OSError, ValueError, io.UnsupportedOperation):
            return False, None
    return False, None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: `__cause__`, `__context__`, urllib3's `.reason`, exception args."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 32:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(x for x in linked if isinstance(x, BaseException))


def is_dropped(exc: BaseException) -> bool:
    """True when the proxy closed the connection before answering at all.

    Real proxies close idle keep-alive connections, and a client reusing one at that
    moment gets this; such a request is sent once more on a new connection before it
    counts against the proxy.
    """
    for cause in causes(exc):
        if isinstance(cause, (RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return True
        if "disconnected without sending a response" in str(cause):  # httpcore's wording
            return True
    return False


_AUTH_WORDS = re.compile(r"\b407\b|username/password|authentication", re.I)


def is_auth_refusal(exc: BaseException) -> bool:
    """The proxy refused our credentials: 407 on CONNECT, SOCKS5 user/password refused."""
    for cause in causes(exc):
        name = type(cause).__name__
        if name in ("SOCKS5AuthError", "ProxyAuthenticationRequired"):
            return True
        if isinstance(cause, OSError) and _AUTH_WORDS.search(str(cause)):
            return True
        if name == "ProxyError" and _AUTH_WORDS.search(str(cause)):
            return True
    return False


_REPR = re.compile(r"<[^<>]*? object at 0x[0-9a-f]+>:?\s*", re.I)


def describe_error(error: BaseException) -> str:
    """A short, secret-free line for an error: its innermost telling cause.

    urllib3 and requests nest the real reason several wrappers deep, with object
    reprs on the way ("Max retries exceeded ... (Caused by ProxyError(...))"); the
    caller wants "ConnectionRefusedError: [Errno 111] Connection refused".
    """
    chosen = error
    for cause in causes(error):
        telling = isinstance(cause, (OSError, ssl.SSLError, TimeoutError)) or type(cause).__name__ in _TLS_ERRORS
        if telling and not _is_wrapper(cause):
            chosen = cause
    text = str(chosen).splitlines()[0] if str(chosen) else ""
    text = _REPR.sub("", text)
    if len(text) > 160:
        text = text[:157] + "..."
    text = mask_credentials(text)
    return f"{type(chosen).__name__}: {text}" if text else type(chosen).__name__


# urllib3's own TLS verdicts (a fingerprint or a hostname that does not match) are not
# `ssl.SSLError`s, yet they are the reason a caller needs to read.
_TLS_ERRORS = ("SSLError", "CertificateError")


def _is_wrapper(exc: BaseException) -> bool:
    """urllib3/requests errors that only carry another one (their text repeats it)."""
    module = type(exc).__module__ or ""
    return module.startswith(("requests", "urllib3")) and type(exc).__name__ in (
        "ConnectionError",
        "ProxyError",
        "MaxRetryError",
        "NewConnectionError",
        "SSLError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectTimeout",
        "ReadTimeout",
        "ProtocolError",
    ) and any(isinstance(a, BaseException) for a in (*exc.args, getattr(exc, "reason", None)))


def mask_credentials(text: str) -> str:
    """Replace `user:password@` in any URL inside `text` by `***@`."""
    return re.sub(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\g<scheme>***@", text, flags=re.I)
