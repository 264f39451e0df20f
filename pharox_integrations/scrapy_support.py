"""Helpers of the Scrapy door: driving an `Exchange` off the reactor, ban-policy hooks,
per-request settings, download slots and the health log line.

Kept apart from `scrapy.py` so the middleware reads as the life cycle of one request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from pharox import ProxyFilters
from scrapy.utils.conf import build_component_list
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.misc import load_object
from twisted.internet import defer, task, threads

from . import bridge
from .broker import LeaseBroker
from .errors import ConfigurationError
from .exchange import Exchange, Step
from .health import HealthPolicy, Verdict
from .lease import ProxyLease
from .settings import filters_from_mapping

logger = logging.getLogger("pharox_integrations.scrapy")

T = TypeVar("T")

HTTPPROXY_MIDDLEWARE = "scrapy.downloadermiddlewares.httpproxy.HttpProxyMiddleware"


def asyncio_running() -> bool:
    """True when the caller runs on an asyncio loop (the asyncio reactor).

    Checked per call rather than per reactor so it works on every Scrapy >= 2.13
    without the reactor helpers that later releases deprecate.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def off_reactor(blocking: bool, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` inline for memory storages, in a worker thread for blocking ones."""
    if not blocking:
        return fn(*args)
    if asyncio_running():
        return await asyncio.to_thread(fn, *args)
    result: T = await maybe_deferred_to_future(threads.deferToThread(fn, *args))
    return result


# ---------------------------------------------------------------------- the exchange off the reactor


class _Twisted:
    """`bridge.Waiter` on a Twisted reactor without asyncio: a wait is a `deferLater`, so
    a request waiting for a lease holds no worker thread (a reactor has 10, and requests
    waiting in them queued past their timeout)."""

    @staticmethod
    def sleep(seconds: float) -> defer.Deferred[None]:
        from twisted.internet import reactor  # the one Scrapy installed, at call time

        return task.deferLater(reactor, seconds, lambda: None)

    @staticmethod
    def in_thread(fn: Callable[[], T], orphaned: Callable[[T], object]) -> defer.Deferred[T]:
        """`fn` in a Twisted worker thread; a result arriving after the caller was
        cancelled (download cancelled, spider closing) goes to `orphaned`, in a thread."""
        result: defer.Deferred[T] = defer.Deferred()

        def arrived(value: T) -> None:
            if result.called:
                threads.deferToThread(orphaned, value)
            else:
                result.callback(value)

        def went_wrong(failure: Any) -> None:
            if not result.called:
                result.errback(failure)

        threads.deferToThread(fn).addCallbacks(arrived, went_wrong)
        return result


TWISTED: bridge.Waiter = _Twisted()


def waiter() -> bridge.Waiter:
    """The running loop's: asyncio's on the asyncio reactor, else Twisted's."""
    return bridge.ASYNCIO if asyncio_running() else TWISTED


async def first_lease(exchange: Exchange) -> ProxyLease:
    """The exchange's first lease, waited for without blocking the reactor."""
    return await exchange.lease_async(waiter())


async def answered(exchange: Exchange, status: int, response: Any, *, verdict: Verdict | None, **kwargs: Any) -> Step:
    """`exchange.answered` without blocking the reactor (a move may wait for a lease)."""
    return await exchange.answered_async(status, response, verdict=verdict, waiter=waiter(), **kwargs)


async def failed(exchange: Exchange, error: BaseException, **kwargs: Any) -> Step:
    """`exchange.failed` without blocking the reactor."""
    return await exchange.failed_async(error, waiter=waiter(), **kwargs)


# ---------------------------------------------------------------------- per request


def meta_filters(value: object) -> ProxyFilters | None:
    """`meta["pharox_filters"]`: ProxyFilters, or a mapping of its fields."""
    if value is None or isinstance(value, ProxyFilters):
        return value
    if isinstance(value, Mapping):
        return filters_from_mapping(value, key='meta["pharox_filters"]')
    raise TypeError(f'meta["pharox_filters"]={value!r}: expected ProxyFilters or a mapping')


def meta_max_moves(meta: Mapping[str, Any], default: int) -> int:
    """`meta["pharox_max_moves"]`, or its deprecated name `meta["pharox_retry_times"]`."""
    moves = meta.get("pharox_max_moves")
    if moves is None and meta.get("pharox_retry_times") is not None:
        warnings.warn(
            'meta["pharox_retry_times"] is deprecated: use meta["pharox_max_moves"] (the same meaning)',
            DeprecationWarning,
            stacklevel=2,
        )
        moves = meta["pharox_retry_times"]
    return default if moves is None else moves


_TUNNEL_STATUS = re.compile(r"CONNECT tunnel.*'status': (\d{3})")


def tunnel_status(error: BaseException) -> int | None:
    """The status a proxy refused a CONNECT with (Scrapy's TunnelError names it in its text)."""
    found = _TUNNEL_STATUS.search(str(error)) if type(error).__name__ == "TunnelError" else None
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------------- ban hooks


class BanPolicy(Protocol):
    """What `PHAROX_BAN_POLICY` (or the spider) may implement; either method is optional.

    Each returns True (a ban: move the request), False (not the proxy's fault) or
    None (let the broker's `HealthPolicy` decide).
    """

    def response_is_ban(self, request: Any, response: Any) -> bool | None: ...

    def exception_is_ban(self, request: Any, exception: BaseException) -> bool | None: ...


def load_ban_policy(path: str | None, crawler: Any) -> Any:
    """Import `PHAROX_BAN_POLICY`: an object, or a class built with `from_crawler` or no arguments."""
    if not path:
        return None
    try:
        obj: Any = load_object(path)
    except (ImportError, NameError, ValueError, AttributeError) as exc:
        raise ConfigurationError(f"PHAROX_BAN_POLICY={path!r}: cannot import it ({exc})") from None
    if isinstance(obj, type):
        obj = obj.from_crawler(crawler) if hasattr(obj, "from_crawler") else obj()
    if not (hasattr(obj, "response_is_ban") or hasattr(obj, "exception_is_ban")):
        raise ConfigurationError(
            f"PHAROX_BAN_POLICY={path!r}: {type(obj).__name__} has neither response_is_ban(request, response) "
            "nor exception_is_ban(request, exception)"
        )
    return obj


def custom_verdict(answer: object, status_code: int | None, policy: HealthPolicy) -> Verdict | None:
    """Translate a ban hook's answer into a verdict (None: no opinion, the core judges).

    False overrides a ban the status code (or the policy's ban detector) would have
    given: the user knows their site.  A 407 stays the proxy's failure.
    """
    if answer is None:
        return None
    if answer:
        return Verdict.BAN
    if status_code is None:
        return Verdict.TARGET_ERROR
    if status_code in policy.proxy_failure_codes:
        return Verdict.FAILURE
    return Verdict.TARGET_ERROR if status_code >= 400 else Verdict.OK


# ---------------------------------------------------------------------- set-up


def httpproxy_after(settings: Any, ours: type) -> bool:
    """True when Scrapy's HttpProxyMiddleware is enabled and runs after this middleware.

    Then it turns the credentials of `meta["proxy"]` into `Proxy-Authorization`
    (and drops a stale header when a request moves); otherwise the middleware sets
    the header itself.
    """
    if not settings.getbool("HTTPPROXY_ENABLED"):
        return False
    order = [
        load_object(c) if isinstance(c, str) else c
        for c in build_component_list(settings.getwithbase("DOWNLOADER_MIDDLEWARES"))
    ]
    proxy_mw = load_object(HTTPPROXY_MIDDLEWARE)
    found = [i for i, c in enumerate(order) if isinstance(c, type) and issubclass(c, proxy_mw)]
    mine = [i for i, c in enumerate(order) if isinstance(c, type) and issubclass(c, ours)]
    return bool(found) and (not mine or found[0] > mine[0])


def slot_key(lease: ProxyLease) -> str:
    """One download slot per proxy.

    Gateways often serve many accounts (one exit each) on one host:port, so entries
    with credentials get a short id suffix rather than sharing one slot.
    """
    if lease.username is None:
        return lease.safe_url
    return f"{lease.safe_url}#{lease.proxy_id.hex[:8]}"


class HealthLog:
    """A periodic INFO line with the pool's health, like Scrapy's LogStats."""

    def __init__(self, broker: LeaseBroker, interval: float, held: Callable[[], int]) -> None:
        self.broker = broker
        self.interval = interval
        self.held = held
        self._loop: task.LoopingCall | None = None
        self._last = (time.monotonic(), 0)

    def start(self) -> None:
        if self.interval > 0 and self._loop is None:
            self._last = (time.monotonic(), self.broker.counters["acquired"])
            self._loop = task.LoopingCall(self._tick)
            self._loop.start(self.interval, now=False).addErrback(
                lambda failure: logger.error("pharox health log stopped: %(e)s", {"e": failure.value})
            )

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _tick(self) -> Awaitable[None] | None:
        if self.broker.storage_blocks:
            return threads.deferToThread(self.log_once)
        self.log_once()
        return None

    def log_once(self) -> None:
        health = self.broker.health()
        now, acquired = time.monotonic(), self.broker.counters["acquired"]
        then, before = self._last
        self._last = (now, acquired)
        rate = (acquired - before) * 60.0 / max(now - then, 1e-9)
        logger.info(
            "pharox: %(health)s; %(held)d lease(s) held by this crawl, %(rate).0f leases/min",
            {"health": health, "held": self.held(), "rate": rate},
        )


def close_spider(crawler: Any, reason: str) -> None:
    """Ask the engine to close the spider, without waiting (we are inside a download)."""
    engine = crawler.engine
    if engine is None:
        return
    closer = getattr(engine, "close_spider_async", None)
    if closer is not None:
        deferred_from_coro(closer(reason=reason))
    elif crawler.spider is not None:  # Scrapy 2.13
        engine.close_spider(crawler.spider, reason)


# ---------------------------------------------------------------- the collector

_frozen_by_crawls = 0  # crawls of this process running under our freeze (all on the reactor thread)


def freeze_start_up() -> bool:
    """Keep every object alive now out of the garbage collector's walks until the crawl ends.

    Why: a crawl keeps hundreds of requests, responses and callbacks alive across young
    collections, so the collector runs a full collection every few hundred pages, and
    each walks every object of the process: Scrapy's, Twisted's and, with a shared
    storage, SQLAlchemy's and the database driver's, none of which ever becomes garbage.
    Measured in `benchmarks/bench_fleet.py`: that walk was most of what a crawler on a
    SQL storage paid over one on memory, and frozen, crawls ran a sixth (memory) to a
    quarter (PostgreSQL) faster.  Garbage the crawl makes is collected as before; a cycle among objects that
    existed at the freeze and is dropped during the crawl waits for `unfreeze_start_up`.
    `gc.freeze()` moves lists, it walks nothing, so it costs the spider's opening nothing.

    Crawls of one process share the freeze: the first to open takes it, the last to
    close gives it back.  Returns False, and does nothing, when the process manages its
    collector itself (collector disabled, or objects frozen by someone else).
    """
    global _frozen_by_crawls
    if _frozen_by_crawls == 0:
        if not gc.isenabled() or gc.get_freeze_count():
            return False
        gc.freeze()
    _frozen_by_crawls += 1
    return True


def unfreeze_start_up() -> None:
    """One crawl that `freeze_start_up` counted has ended; the last one unfreezes."""
    global _frozen_by_crawls
    if _frozen_by_crawls == 0:
        return
    _frozen_by_crawls -= 1
    if _frozen_by_crawls == 0:
        gc.unfreeze()
