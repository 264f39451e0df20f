"""Scrapy door: `PharoxProxyMiddleware` leases one proxy per request from a managed pool.

    DOWNLOADER_MIDDLEWARES = {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610}
    PHAROX_PROXIES = ["http://user:pass@10.0.0.1:8080", ...]  # or PHAROX_STORAGE_URL / PHAROX_BROKER

Per request: `meta["pharox_pool"]`, `meta["pharox_filters"]` (ProxyFilters or a
mapping), `meta["pharox_session"]` (sticky proxy), `meta["pharox_max_moves"]`;
`meta["dont_proxy"]` or a spider-set `meta["proxy"]` leaves the request alone.
After download `meta["pharox_proxy"]` names the proxy that served it (no secret).

Each request's trip through the pool is one `Exchange` (the core decides every step),
kept in `meta`.  Scrapy moves a request by returning a new `Request`: the copy carries
the same exchange, whose next lease the core has already prepared.  When every proxy
bans, the last ban answer goes on down the chain like any response; when every proxy
fails, the errback gets `AllProxiesFailed`.
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

from .broker import HTTP_PROTOCOLS, LeaseBroker, ProxyLease
from .errors import NoProxyAvailable
from .exchange import Exchange, Step
from .health import Verdict
from .scrapy_support import (
    HealthLog,
    answered,
    close_spider,
    custom_verdict,
    failed,
    first_lease,
    freeze_start_up,
    httpproxy_after,
    load_ban_policy,
    meta_filters,
    meta_max_moves,
    off_reactor,
    slot_key,
    tunnel_status,
    unfreeze_start_up,
)
from .settings import PharoxSettings

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

__all__ = ["PharoxProxyMiddleware"]

logger = logging.getLogger("pharox_integrations.scrapy")

EXCHANGE = "_pharox_exchange"  # the request's Exchange; a moved copy carries the same one
MANAGED = "_pharox_managed"  # meta["proxy"] was set by us, so a copy may be re-leased
SLOT = "_pharox_slot"  # the download slot we set
SLOTS_CACHED = 100_000  # download slot names kept (one per proxy seen)
NO_REPORT = (IgnoreRequest, defer.CancelledError, asyncio.CancelledError)  # not the proxy's doing


class PharoxProxyMiddleware:
    """Downloader middleware: one `Exchange` per request, driven by Scrapy's events."""

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
        self.max_moves = settings.max_moves
        self.download_timeout = crawler.settings.getfloat("DOWNLOAD_TIMEOUT")
        self.close_on_exhausted = settings.on_exhausted == "close_spider"
        self.per_proxy_slot = settings.download_slot
        self.gc_freeze = settings.gc_freeze
        self._frozen = False  # this crawl counts in freeze_start_up's freeze
        self.ban_policy = load_ban_policy(settings.ban_policy, crawler)
        self.header_by_scrapy = httpproxy_after(crawler.settings, type(self))
        self._slots: dict[UUID, str] = {}  # proxy id -> its download slot name
        # Every exchange holding a lease -> (its request, queued): queued requests were
        # moved and wait in the scheduler to come back through process_request.
        self._held: dict[Exchange, tuple[Request, bool]] = {}
        self._closing = False
        self._sweeper = task.LoopingCall(self._sweep_orphans)
        self._health_log = HealthLog(broker, settings.logstats_interval, lambda: len(self._held))
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self._engine_stopped, signal=signals.engine_stopped)
        crawler.signals.connect(self._request_dropped, signal=signals.request_dropped)

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
        ex, queued = self._owned(request)
        if ex is not None and queued:  # our moved request is back
            self._held[ex] = (request, False)
            self._send_through(request, ex.current or ex.lease())  # the lease the move prepared
            return None
        if EXCHANGE in meta:  # meta copied from another request (a later middleware's replacement)
            ex = meta.pop(EXCHANGE)
            if ex in self._held:  # whose lease was never settled
                await self._close(ex)
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
        ex = self.broker.exchange(
            request.url,
            pool=meta.get("pharox_pool"),
            filters=meta_filters(meta.get("pharox_filters")),
            session=meta.get("pharox_session"),
            protocols=HTTP_PROTOCOLS,
            max_moves=meta_max_moves(meta, self.max_moves),
            body=request.body,
            timeout=meta.get("download_timeout", self.download_timeout) or None,
        )
        try:
            lease = await first_lease(ex)
        except NoProxyAvailable as exc:
            self._exhausted(exc)
        meta[EXCHANGE] = ex
        self._held[ex] = (request, False)
        self._acquired()
        self._send_through(request, lease)
        return None

    def _send_through(self, request: Request, lease: ProxyLease) -> None:
        meta = request.meta
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

    def _acquired(self) -> None:
        self._inc("pharox/leases/acquired")
        if len(self._held) > self._peak:
            self._peak = len(self._held)
            self.stats.max_value("pharox/leases/peak_active", self._peak)

    def _exhausted(self, exc: NoProxyAvailable) -> NoReturn:
        self.stats.inc_value("pharox/no_proxy_available")
        if exc.site is not None and exc.next_usable_in is not None:
            # One site holds the pool off (bans, cool-downs, spacing): its request goes,
            # the crawl of the other sites goes on whatever PHAROX_ON_EXHAUSTED says.
            self.stats.inc_value("pharox/site/exhausted")
            logger.warning("pharox: no proxy usable for this site now, request ignored: %(why)s", {"why": exc})
            raise IgnoreRequest(f"no proxy available: {exc}") from None
        if self.close_on_exhausted and not self._closing:
            self._closing = True
            logger.error("pharox: no proxy available, closing the spider: %(why)s", {"why": exc})
            close_spider(self.crawler, "pharox_no_proxies")
        elif not self.close_on_exhausted:
            logger.warning("pharox: no proxy available, request ignored: %(why)s", {"why": exc})
        raise IgnoreRequest(f"no proxy available: {exc}") from None

    # ------------------------------------------------------------------ outcome

    async def process_response(self, request: Request, response: Response, spider: object = None) -> Any:
        ex = await self._sending(request)
        if ex is None:
            return response
        step = await self._settle(ex, request, response, response.status)
        if step is Step.MOVE or step is Step.RESEND:
            return self._requeue(ex, request)
        if step is Step.RAISE and ex.error is not None:
            raise ex.error  # AllProxiesFailed: the last proxy refused us (407)
        return response  # on down the chain: RetryMiddleware, HttpErrorMiddleware, the callback

    async def process_exception(self, request: Request, exception: Exception, spider: object = None) -> Any:
        ex = await self._sending(request)
        if ex is None:
            return None
        if isinstance(exception, NO_REPORT):
            await self._close(ex, request)
            return None
        step = await self._settle(ex, request, exception, None)
        if step is Step.MOVE or step is Step.RESEND:
            return self._requeue(ex, request)
        if ex.error is exception or ex.error is None:
            return None  # not the proxy's doing: the error goes on as it is
        raise ex.error from exception  # every proxy failed: the errback gets AllProxiesFailed

    async def _sending(self, request: Request) -> Exchange | None:
        """The exchange this request is being sent through, if it is ours.

        A moved request answered before it reached process_request (an earlier
        middleware's cache or error) gives back the lease its move prepared.
        """
        ex, queued = self._owned(request)
        if ex is not None and (queued or ex.current is None):
            await self._close(ex, request)
            return None
        return ex

    def _owned(self, request: Request) -> tuple[Exchange | None, bool]:
        """(the exchange `request` owns, whether it waits in the scheduler after a move)."""
        ex: Exchange | None = request.meta.get(EXCHANGE)
        owner = None if ex is None else self._held.get(ex)
        if owner is None or owner[0] is not request:
            return None, False
        return ex, owner[1]

    async def _settle(self, ex: Exchange, request: Request, outcome: Any, status: int | None) -> Step:
        """Hand the answer (`status` set) or the error to the core; keep the stats of its step."""
        lease = ex.current
        assert lease is not None
        _scrub(request.meta, lease)
        hook = self._hook(0 if status is not None else 1)
        try:
            verdict = custom_verdict(None if hook is None else hook(request, outcome), status, self.broker.policy)
        except BaseException:
            await self._close(ex, request)  # the spider's bug, not the proxy's: no report
            raise
        if status is not None:
            latency = request.meta.get("download_latency")
            latency_ms = latency * 1000.0 if isinstance(latency, (int, float)) else None
            step_of = answered(ex, status, outcome, latency_ms=latency_ms, verdict=verdict)
        else:
            step_of = failed(ex, outcome, status_code=tunnel_status(outcome), verdict=verdict)
        try:
            step = await step_of
        finally:  # RETURN, RAISE, a failed report: done; a MOVE holds the next lease (see _requeue)
            if lease.released and self._held.pop(ex, None) is not None:
                self._inc("pharox/leases/released")
                request.meta.pop(EXCHANGE, None)
        verdict = lease.verdict
        if verdict is None:
            return step
        self._inc(f"pharox/verdict/{verdict.value}/{status or type(outcome).__name__}")
        if not verdict.moves_request:
            return step
        if verdict.site_refusal:
            kind = "bans" if verdict is Verdict.BAN else "cooldowns"
            self._inc(f"pharox/{kind}")
            if lease.site is not None:
                self._inc(f"pharox/site/{kind}")  # counts only: one key per site would be unbounded
        else:
            self._inc("pharox/failures")
        if step is Step.MOVE:
            self._inc("pharox/moved")
            self._inc(f"pharox/moved/{verdict.value}")
        elif step is not Step.RESEND:
            self._inc("pharox/moved/gave_up")
            logger.warning(
                "pharox: %(request)s: %(why)s", {"request": request, "why": "; ".join(map(str, ex.attempts))}
            )
        return step

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

    def _requeue(self, ex: Exchange, request: Request) -> Request:
        """The copy Scrapy schedules again; it carries the exchange (and its next lease)."""
        moved = request.replace(dont_filter=True)
        moved.meta[EXCHANGE] = ex
        new_lease = ex.current is None
        self._held[ex] = (moved, True)
        if new_lease:
            self._acquired()
        logger.debug("pharox: %(request)s moved to another proxy", {"request": request})
        return moved

    async def _close(self, ex: Exchange, request: Request | None = None) -> None:
        """Release what the exchange holds, without a report: the outcome says nothing
        about the proxy (or it was never known)."""
        if request is not None:
            request.meta.pop(EXCHANGE, None)
            if ex.current is not None:
                _scrub(request.meta, ex.current)
        if self._held.pop(ex, None) is not None:
            self._inc("pharox/leases/released")
        await off_reactor(self.broker.storage_blocks, ex.close)

    # ------------------------------------------------------------------ life cycle

    def _spider_opened(self) -> None:
        if self.gc_freeze:  # start-up is over: what exists now lives as long as the crawl
            self._frozen = freeze_start_up()
        self._health_log.start()
        if self.orphan_sweep_seconds > 0:
            self._sweeper.start(self.orphan_sweep_seconds, now=False).addErrback(
                lambda failure: logger.error("pharox: lease sweeper stopped: %(e)s", {"e": failure.value})
            )

    def _sweep_orphans(self) -> defer.Deferred[None] | None:
        """Release leases whose request is no longer in the downloader.

        The downloader holds a request in `active` from before the first
        process_request until after the last process_response, so a lease still held
        for a request outside it can no longer be settled by this middleware.  Moved
        requests waiting in the scheduler are not orphans.
        """
        engine = self.crawler.engine
        active = getattr(getattr(engine, "downloader", None), "active", None)
        if active is None:
            return None
        orphans = [ex for ex, (request, queued) in self._held.items() if not queued and request not in active]
        if not orphans:
            return None
        self.stats.inc_value("pharox/leases/released_orphaned", len(orphans))
        logger.info(
            "pharox: released %(n)d lease(s) of requests that left the downloader without a response "
            "reaching this middleware",
            {"n": len(orphans)},
        )
        return deferred_from_coro(self._close_each(orphans))

    async def _close_each(self, exchanges: list[Exchange]) -> None:
        for ex in exchanges:
            await self._close(ex)

    def _request_dropped(self, request: Request) -> None:
        """A moved request the scheduler refused: give back the lease it was to use."""
        ex, queued = self._owned(request)
        if ex is not None and queued:
            deferred_from_coro(self._close(ex, request))

    async def _spider_closed(self, reason: str) -> None:
        self._health_log.stop()
        if self._sweeper.running:
            self._sweeper.stop()
        await self._release_all("spider close")

    async def _engine_stopped(self) -> None:
        await self._release_all("engine stop")

    async def _release_all(self, when: str) -> None:
        if self._frozen:  # first, so a failing release below cannot keep the process frozen
            self._frozen = False
            unfreeze_start_up()
        left = list(self._held)
        await self._close_each(left)
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
