"""Scrapy door: `PharoxProxyMiddleware` leases one proxy per request from a managed pool.

    DOWNLOADER_MIDDLEWARES = {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610}
    PHAROX_PROXIES = ["http://user:pass@10.0.0.1:8080", ...]  # or PHAROX_STORAGE_URL / PHAROX_BROKER

Per request: `meta["pharox_pool"]`, `meta["pharox_filters"]` (ProxyFilters or a
mapping), `meta["pharox_session"]` (sticky proxy), `meta["pharox_retry_times"]`;
`meta["dont_proxy"]` or a spider-set `meta["proxy"]` leaves the request alone.
After download `meta["pharox_proxy"]` names the proxy that served it (no secret).
"""

from __future__ import annotations

import asyncio
import logging
from types import MethodType
from typing import TYPE_CHECKING, Any, NoReturn
from uuid import UUID

from scrapy import signals
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.utils.defer import deferred_from_coro
from twisted.internet import defer, task

from .attempts import ProxyAttempts
from .broker import LeaseBroker, ProxyLease
from .errors import NoProxyAvailable
from .health import Verdict
from .scrapy_support import (
    HealthLog,
    acquire,
    close_spider,
    custom_verdict,
    httpproxy_after,
    load_ban_policy,
    meta_filters,
    off_reactor,
    outcome_detail,
    slot_key,
)
from .settings import PharoxSettings

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

__all__ = ["PharoxProxyMiddleware"]

logger = logging.getLogger("pharox_integrations.scrapy")

LEASE = "_pharox_lease"  # the held ProxyLease; popped when the lease is settled
MANAGED = "_pharox_managed"  # meta["proxy"] was set by us, so a copy may be re-leased
SLOT = "_pharox_slot"  # the download slot we set
RETRIES_LEFT = "_pharox_retries_left"
ATTEMPTS = "_pharox_attempts"
SLOTS_CACHED = 100_000  # download slot names kept (one per proxy seen)
NO_REPORT = (IgnoreRequest, defer.CancelledError, asyncio.CancelledError)  # not the proxy's doing


class PharoxProxyMiddleware:
    """Downloader middleware: acquire → download → report → release, one proxy per request."""

    #: How often leases of requests that left the downloader unsettled are looked for
    #: (a later middleware's process_response raised, so ours never ran).
    orphan_sweep_seconds = 5.0

    def __init__(self, crawler: Crawler, broker: LeaseBroker, settings: PharoxSettings, *, owns_broker: bool) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        # Bound from the class, once: Scrapy 2.14+ routes every instance lookup of a stats
        # method through a spider-argument deprecation shim that costs more than the increment.
        self._inc = MethodType(type(crawler.stats).inc_value, crawler.stats)
        self._peak = 0  # the highest `pharox/leases/peak_active` written so far
        self._hooks: tuple[object, Any, Any] = (self, None, None)  # (spider, response hook, exception hook)
        self.broker = broker
        self.owns_broker = owns_broker
        self.retry_times = settings.retry_times
        self.close_on_exhausted = settings.on_exhausted == "close_spider"
        self.per_proxy_slot = settings.download_slot
        self.ban_policy = load_ban_policy(settings.ban_policy, crawler)
        self.header_by_scrapy = httpproxy_after(crawler.settings, type(self))
        self._slots: dict[UUID, str] = {}  # proxy id -> its download slot name
        self._held: dict[ProxyLease, Request] = {}  # keyed by identity: cheaper to hash than the lease id
        self._closing = False
        self._sweeper = task.LoopingCall(self._sweep_orphans)
        self._health_log = HealthLog(broker, settings.logstats_interval, lambda: len(self._held))
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self._engine_stopped, signal=signals.engine_stopped)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> PharoxProxyMiddleware:
        settings = PharoxSettings.from_mapping(crawler.settings)  # bad values raise here, at start-up
        if not settings.configured:
            logger.info(
                "PharoxProxyMiddleware disabled: set PHAROX_PROXIES, PHAROX_PROXIES_FILE, "
                "PHAROX_STORAGE_URL (with PHAROX_POOL) or PHAROX_BROKER"
            )
            raise NotConfigured("no PHAROX_PROXIES, PHAROX_PROXIES_FILE, PHAROX_STORAGE_URL or PHAROX_BROKER")
        return cls(crawler, LeaseBroker.from_settings(settings), settings, owns_broker=not settings.broker)

    # ------------------------------------------------------------------ request

    async def process_request(self, request: Request, spider: object = None) -> None:
        meta = request.meta
        if LEASE in meta:  # a copy of a request whose lease was never settled
            await self._settle(meta.pop(LEASE), None)
        if meta.get("dont_proxy"):
            if meta.pop(MANAGED, False):  # meta copied from one of our requests: undo our proxy
                meta["proxy"] = None  # direct, whatever HTTP(S)_PROXY says
                request.headers.pop(b"Proxy-Authorization", None)
                meta.pop("pharox_proxy", None)
                if meta.get("download_slot") == meta.pop(SLOT, None):
                    meta.pop("download_slot", None)
            return None
        if "proxy" in meta and not meta.get(MANAGED):
            return None
        filters = meta.get("pharox_filters")
        try:
            lease = await acquire(
                self.broker,
                request.url,
                pool=meta.get("pharox_pool"),
                filters=None if filters is None else meta_filters(filters),
                session=meta.get("pharox_session"),
            )
        except NoProxyAvailable as exc:
            self._exhausted(exc)
        held = self._held
        held[lease] = request
        self._inc("pharox/leases/acquired")
        if len(held) > self._peak:
            self._peak = len(held)
            self.stats.max_value("pharox/leases/peak_active", self._peak)
        meta[LEASE] = lease
        meta[MANAGED] = True
        meta["pharox_proxy"] = safe_url = lease.safe_url
        if self.header_by_scrapy:
            meta["proxy"] = lease.url  # HttpProxyMiddleware (750) turns the credentials into the header
        else:
            meta["proxy"] = safe_url
            auth = lease.proxy_authorization
            if auth is None:
                request.headers.pop(b"Proxy-Authorization", None)
            else:
                request.headers[b"Proxy-Authorization"] = auth
        if self.per_proxy_slot and meta.get("download_slot") in (None, meta.get(SLOT)):
            slot = self._slots.get(lease.proxy_id)
            if slot is None:
                if len(self._slots) >= SLOTS_CACHED:  # proxies come and go: keep the cache bounded
                    self._slots.clear()
                slot = self._slots[lease.proxy_id] = slot_key(lease)
            meta["download_slot"] = meta[SLOT] = slot
        return None

    def _exhausted(self, exc: NoProxyAvailable) -> NoReturn:
        self.stats.inc_value("pharox/no_proxy_available")
        if self.close_on_exhausted and not self._closing:
            self._closing = True
            logger.error("pharox: no proxy available, closing the spider: %(why)s", {"why": exc})
            close_spider(self.crawler, "pharox_no_proxies")
        elif not self.close_on_exhausted:
            logger.warning("pharox: no proxy available, request ignored: %(why)s", {"why": exc})
        raise IgnoreRequest(f"no proxy available: {exc}") from None

    # ------------------------------------------------------------------ outcome

    async def process_response(self, request: Request, response: Response, spider: object = None) -> Any:
        meta = request.meta
        if LEASE not in meta:
            return response
        lease = meta.pop(LEASE)
        latency = meta.get("download_latency")
        hook = self._hook(0)
        try:
            answer = None if hook is None else hook(request, response)
        except BaseException:
            await self._give_back(lease, request)  # the spider's bug, not the proxy's: no report
            raise
        moved = await self._settle(
            lease,
            request,
            status_code=response.status,
            response=response,
            latency_ms=latency * 1000.0 if isinstance(latency, (int, float)) else None,
            answer=answer,
        )
        return moved or response

    async def process_exception(self, request: Request, exception: Exception, spider: object = None) -> Any:
        lease = request.meta.pop(LEASE, None)
        if lease is None:
            return None
        if isinstance(exception, NO_REPORT):
            await self._give_back(lease, request)
            return None
        hook = self._hook(1)
        try:
            answer = None if hook is None else hook(request, exception)
        except BaseException:
            await self._give_back(lease, request)
            raise
        return await self._settle(lease, request, error=exception, answer=answer)

    async def _give_back(self, lease: ProxyLease, request: Request) -> None:
        """Release without a report: the outcome says nothing about the proxy."""
        _scrub(request.meta, lease)
        await self._settle(lease, None)

    def _hook(self, which: int) -> Any:
        """The spider's response_is_ban (0) / exception_is_ban (1) first, scrapy-rotating-proxies
        style, then PHAROX_BAN_POLICY's; looked up once per spider, not per response."""
        spider = self.crawler.spider
        if self._hooks[0] is not spider:
            self._hooks = (
                spider,
                getattr(spider, "response_is_ban", None) or getattr(self.ban_policy, "response_is_ban", None),
                getattr(spider, "exception_is_ban", None) or getattr(self.ban_policy, "exception_is_ban", None),
            )
        return self._hooks[1 + which]

    async def _settle(
        self,
        lease: ProxyLease,
        request: Request | None,
        *,
        status_code: int | None = None,
        error: BaseException | None = None,
        response: Response | None = None,
        latency_ms: float | None = None,
        answer: object = None,
    ) -> Request | None:
        """Report (unless `request` is None), release, and maybe move the request to another proxy."""
        self._held.pop(lease, None)
        blocks = self.broker.storage_blocks
        if request is None:
            if blocks:
                await off_reactor(True, self._release, lease)
            else:
                self._release(lease)
            return None
        meta = request.meta
        _scrub(meta, lease)
        retries = meta.get(RETRIES_LEFT, meta.get("pharox_retry_times", self.retry_times))
        attempts = ProxyAttempts(self.broker, retries)
        if ATTEMPTS in meta:
            attempts.attempts = list(meta[ATTEMPTS])
        args = (lease, attempts, status_code, error, response, latency_ms, answer)
        # Memory storages answer inline: no coroutine to build and await per response.
        verdict = await off_reactor(True, self._report_release, *args) if blocks else self._report_release(*args)
        outcome = verdict.value
        self._inc(f"pharox/verdict/{outcome}/{status_code if error is None else outcome_detail(error)}")
        if not verdict.moves_request:
            return None
        self._inc("pharox/bans" if verdict is Verdict.BAN else "pharox/failures")
        if attempts.should_move(verdict):
            self._inc("pharox/moved")
            self._inc(f"pharox/moved/{outcome}")
            moved = request.replace(dont_filter=True)
            moved.meta[RETRIES_LEFT] = attempts.retries_left
            moved.meta[ATTEMPTS] = attempts.attempts
            logger.debug(
                "pharox: %(request)s moved off %(proxy)s (%(verdict)s)",
                {"request": request, "proxy": lease.safe_url, "verdict": outcome},
            )
            return moved
        self._inc("pharox/moved/gave_up")
        logger.warning("pharox: %(request)s: %(why)s", {"request": request, "why": attempts.failure()})
        return None

    def _report_release(
        self,
        lease: ProxyLease,
        attempts: ProxyAttempts,
        status_code: int | None,
        error: BaseException | None,
        response: Response | None,
        latency_ms: float | None,
        answer: object,
    ) -> Verdict:
        """Report then release, in one trip off the reactor (SQL storages)."""
        fresh = not lease.released
        try:
            verdict = None
            if answer is not None:
                verdict = custom_verdict(answer, status_code, self.broker.policy.judge(status_code, error))
            return attempts.judge(
                lease,
                status_code=status_code,
                error=error,
                response=response,
                latency_ms=latency_ms,
                verdict=verdict,
                release=True,
            )
        finally:
            self.broker.release(lease)  # a no-op after `judge`; gives it back when the hook failed first
            if fresh:
                self._inc("pharox/leases/released")

    def _release(self, lease: ProxyLease) -> None:
        if self.broker.release(lease):
            self._inc("pharox/leases/released")

    # ------------------------------------------------------------------ life cycle

    def _spider_opened(self) -> None:
        self._health_log.start()
        if self.orphan_sweep_seconds > 0:
            self._sweeper.start(self.orphan_sweep_seconds, now=False).addErrback(
                lambda failure: logger.error("pharox: lease sweeper stopped: %(e)s", {"e": failure.value})
            )

    def _sweep_orphans(self) -> defer.Deferred[None] | None:
        """Release leases whose request is no longer in the downloader.

        The downloader holds a request in `active` from before the first
        process_request until after the last process_response, so a lease still held
        for a request outside it can no longer be settled by this middleware.
        """
        engine = self.crawler.engine
        active = getattr(getattr(engine, "downloader", None), "active", None)
        if active is None:
            return None
        orphans = [lease for lease, request in self._held.items() if request not in active]
        if not orphans:
            return None
        for lease in orphans:
            del self._held[lease]
        self.stats.inc_value("pharox/leases/released_orphaned", len(orphans))
        logger.info(
            "pharox: released %(n)d lease(s) of requests that left the downloader without a response "
            "reaching this middleware",
            {"n": len(orphans)},
        )
        return deferred_from_coro(self._release_each(orphans))

    async def _release_each(self, leases: list[ProxyLease]) -> None:
        for lease in leases:
            await off_reactor(self.broker.storage_blocks, self._release, lease)

    async def _spider_closed(self, reason: str) -> None:
        self._health_log.stop()
        if self._sweeper.running:
            self._sweeper.stop()
        await self._release_all("spider close")

    async def _engine_stopped(self) -> None:
        await self._release_all("engine stop")

    async def _release_all(self, when: str) -> None:
        left = list(self._held)
        self._held.clear()
        await self._release_each(left)
        if left:
            self.stats.inc_value("pharox/leases/released_at_close", len(left))
            logger.info("pharox: released %(n)d lease(s) still held at %(when)s", {"n": len(left), "when": when})
        if self.owns_broker:
            await off_reactor(self.broker.storage_blocks, self.broker.close)


def _scrub(meta: dict[str, Any], lease: ProxyLease) -> None:
    """Never leave credentials in meta: errbacks and logs see the request after us.

    Until HttpProxyMiddleware (750) has turned them into the header, `meta["proxy"]`
    holds them; a request that fails before that point would carry them on.
    """
    if meta.get("proxy") == lease.url:
        meta["proxy"] = lease.safe_url
