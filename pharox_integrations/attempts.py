"""Moving one request between proxies: the decision every door shares.

A door sends through a lease, then asks `ProxyAttempts.judge` whether to move the
request to another proxy.  The broker's policy decides; this object only counts the
tries left and keeps the per-proxy story for the final error.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.client import RemoteDisconnected
from typing import Any
from uuid import UUID

from .broker import LeaseBroker, ProxyLease
from .errors import AllProxiesFailed, ProxyAttempt
from .health import Verdict


def describe_error(error: BaseException) -> str:
    """`ExceptionName: first line of the message`, with any URL credentials masked."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {mask_credentials(text)}" if text else type(error).__name__


def mask_credentials(text: str) -> str:
    """Replace `user:password@` in any URL inside `text` by `***@`."""
    import re

    return re.sub(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\g<scheme>***@", text, flags=re.I)


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


def is_dropped_connection(exc: BaseException) -> bool:
    """True when the proxy closed the connection before answering at all.

    Real proxies close idle keep-alive connections, and a client reusing one at that
    moment gets this; doors send such a request once more (on a new connection)
    before it counts against the proxy.
    """
    for cause in causes(exc):
        if isinstance(cause, (RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return True
        if "disconnected without sending a response" in str(cause):  # httpcore's wording
            return True
    return False


class ProxyAttempts:
    """The tries of one request: at most `1 + retries` proxies."""

    def __init__(self, broker: LeaseBroker, retries: int) -> None:
        if retries < 0:
            raise ValueError(f"retries={retries!r}: expected an integer >= 0")
        self.broker = broker
        self.retries_left = retries
        # Raw outcomes; ProxyAttempt objects are built only when someone asks.
        self._outcomes: list[ProxyAttempt | tuple[str, Verdict, int | None, BaseException | None]] = []
        #: proxies already tried: pass as `broker.acquire(..., avoid=attempts.tried)`
        self.tried: set[UUID] = set()

    def judge(
        self,
        lease: ProxyLease,
        *,
        status_code: int | None = None,
        error: BaseException | None = None,
        response: Any = None,
        latency_ms: float | None = None,
        verdict: Verdict | None = None,
        release: bool = False,
    ) -> Verdict:
        """Report the outcome to the broker and record it (and the proxy as tried); see `should_move`.

        `release=True`: the request is done with the proxy; give it back in the same
        broker call (`LeaseBroker.finish`), even when the report fails.
        """
        self.tried.add(lease.proxy_id)
        report = self.broker.finish if release else self.broker.report
        verdict = report(lease, status_code, error, latency_ms, response=response, verdict=verdict)
        self._outcomes.append((lease.safe_url, verdict, status_code, error))
        return verdict

    @property
    def attempts(self) -> list[ProxyAttempt]:
        """Each proxy's outcome, in order (built when asked: most requests never ask)."""
        return [_built(outcome) for outcome in self._outcomes]

    @attempts.setter
    def attempts(self, earlier: list[ProxyAttempt]) -> None:
        """Carry the story of a request across objects (Scrapy re-creates it per response)."""
        self._outcomes = list(earlier)

    def should_move(self, verdict: Verdict) -> bool:
        """True (and one try used) when the verdict asks for another proxy and tries remain."""
        if verdict.moves_request and self.retries_left > 0:
            self.retries_left -= 1
            return True
        return False

    def failure(self, cls: type[AllProxiesFailed] = AllProxiesFailed) -> AllProxiesFailed:
        """The error for a request whose every proxy failed (names each, no secret)."""
        return cls(self.attempts)


def _built(outcome: ProxyAttempt | tuple[str, Verdict, int | None, BaseException | None]) -> ProxyAttempt:
    if isinstance(outcome, ProxyAttempt):
        return outcome
    url, verdict, code, error = outcome
    return ProxyAttempt(url, verdict.value, f"HTTP {code}" if error is None else describe_error(error))
