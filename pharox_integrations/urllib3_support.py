"""What the two doors that send through urllib3 share (`urllib3.py`, and `requests.py`,
whose adapter hands every request to a urllib3 pool): one copy, so they cannot drift.

- `OpenExchanges`: the requests a door holds a lease for (in flight, or a streamed body
  not read yet), so `held` counts them and closing the door releases the streams.
- Releasing a lease when a streamed body ends, tied to the urllib3 response's own
  `release_conn` (as requests ties the connection to it: the body owns the connection),
  with a finalizer for a response dropped unread.
- `connect_timeout`: waiting for a proxy is part of connecting, whatever form the
  caller gave the timeout in.
- `leased_protocols` and `socks_hint`: SOCKS proxies are leased only with PySocks (the
  socks extra) installed, and a pool of SOCKS proxies without it says how to fix that.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

from pharox import ProxyProtocol
from urllib3 import BaseHTTPResponse, Timeout
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from .broker import HTTP_PROTOCOLS
from .errors import NoProxyAvailable
from .exchange import Exchange
from .routes import CLOSER

__all__ = ["OpenExchanges", "connect_timeout", "leased_protocols", "socks_hint"]

logger = logging.getLogger("pharox_integrations")

# What urllib3 raises from `read()` when the connection under a streamed body breaks.
_READ_ERRORS = (ProtocolError, ReadTimeoutError)


class OpenExchanges:
    """The exchanges of one door not ended yet: in flight, or held by a streamed body.

    Used only through single dict operations (atomic), so without a lock: every request
    of a door passes here twice.  `end` is idempotent, whoever gets there first (the
    request's own code, the body's end, `end_streams` at the door's close, a finalizer).

    `defer_close`: the response's `close()` only queues the release on `CLOSER` (where
    garbage collection, which also calls `close()`, cannot re-enter the broker).  For the
    requests door, whose users close the `requests.Response`: it calls `release_conn()`
    too, which releases at once.  urllib3's users close the urllib3 response itself and
    get the lease back before `close()` returns.
    """

    __slots__ = ("_open", "defer_close")

    def __init__(self, *, defer_close: bool) -> None:
        self.defer_close = defer_close
        # The value: None while in flight; a streamed body's finalizer once it holds the exchange.
        self._open: dict[Exchange, weakref.finalize[Any, Any] | None] = {}

    def add(self, ex: Exchange) -> Exchange:
        """`ex` is in flight (returned for chaining)."""
        self._open[ex] = None
        return ex

    def stream(self, ex: Exchange, response: BaseHTTPResponse) -> None:
        """From now on `response`'s body holds `ex`: it ends when the body lets go of its
        connection (read to the end, `release_conn()`, `drain_conn()`, `close()`, a failed
        read: judged against the proxy) or when the response is garbage-collected.

        The wrappers hold the response weakly, so it stays free of cycles; the finalizer
        only queues the release for `CLOSER` (it runs at any allocation, possibly inside
        the broker).
        """
        end: Callable[..., None] = partial(self.end, ex)
        ref = weakref.ref(response)
        release_conn, close = type(response).release_conn, type(response).close

        def released() -> None:
            failed = sys.exc_info()[1]  # urllib3 releases while a failed read unwinds
            try:
                if (target := ref()) is not None:
                    release_conn(target)
            finally:
                end(failed if isinstance(failed, _READ_ERRORS) else None)

        def closed() -> None:
            try:
                if (target := ref()) is not None:
                    close(target)
            finally:
                if self.defer_close:
                    CLOSER.put(end)
                else:
                    end()

        response.release_conn = released  # type: ignore[method-assign]
        response.close = closed  # type: ignore[method-assign]
        finalizer = weakref.finalize(response, CLOSER.put, end)
        finalizer.atexit = False  # at exit the broker's own close() releases what is left
        self._open[ex] = finalizer

    def end(self, ex: Exchange, error: BaseException | None = None) -> None:
        """`ex` is over (idempotent): every lease it holds goes back.  `error`: reading its
        streamed body failed."""
        try:
            finalizer = self._open.pop(ex)
        except KeyError:
            return
        if finalizer is not None:
            finalizer.detach()
        ex.close(error)

    def end_unless_streaming(self, ex: Exchange) -> None:
        """The request's own code is done with `ex`: ended, unless a streamed body holds it."""
        if self._open.get(ex) is None:
            self.end(ex)

    def end_streams(self) -> int:
        """End every exchange a streamed body holds (closing the door); how many there were.
        Those in flight are left to their requests, which end them on the way out."""
        streams = [ex for ex, finalizer in self._open.copy().items() if finalizer is not None]
        for ex in streams:
            try:
                self.end(ex)
            except Exception:  # released all the same (the core releases first); the others must be too
                logger.warning("recording a streamed answer's outcome failed", exc_info=True)
        return len(streams)

    def __len__(self) -> int:
        return len(self._open)


def connect_timeout(timeout: Any) -> float | None:
    """The connect part of a timeout (a number, a (connect, read) pair or a urllib3
    `Timeout`), None when not set: waiting for a proxy is part of connecting."""
    if isinstance(timeout, tuple):
        timeout = timeout[0]
    elif isinstance(timeout, Timeout):
        timeout = timeout.connect_timeout
    return float(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None


def leased_protocols() -> frozenset[ProxyProtocol] | None:
    """The protocols a door built on urllib3 can lease: every one with PySocks (the socks
    extra), HTTP(S) only without.  None (no restriction) rather than every protocol keeps
    the storages' fast path."""
    return None if importlib.util.find_spec("socks") is not None else HTTP_PROTOCOLS


def socks_hint(exc: NoProxyAvailable, protocols: frozenset[ProxyProtocol] | None) -> NoProxyAvailable:
    """`exc`, saying how to lease the SOCKS proxies it skipped when PySocks is missing."""
    if protocols is not None and ProxyProtocol.SOCKS5 not in protocols and exc.counts.get("wrong_protocol"):
        exc.args = (f"{exc}; SOCKS proxies need the socks extra: pip install 'pharox-integrations[socks]'",)
    return exc
