"""Real crawls through real proxies: rotation, bans, dead proxies, moves, leaks, secrets."""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
import scrapy_brokers
from conftest import Crawl, assert_no_leases
from pharox import ProxyStatus
from scrapy import Request, Spider
from scrapy.exceptions import IgnoreRequest
from scrapy.http import Response
from scrapy_spiders import Pages, Urls, assert_auth_only_to_its_proxy, assert_no_secret, echo
from servers import TargetServer

from pharox_integrations import HealthPolicy, LeaseBroker
from pharox_integrations.exchange import Exchange
from pharox_integrations.scrapy import PharoxProxyMiddleware
from pharox_integrations.scrapy_support import freeze_start_up, unfreeze_start_up

pytestmark = pytest.mark.filterwarnings("error::scrapy.exceptions.ScrapyDeprecationWarning")


def status_by_port(broker: LeaseBroker) -> dict[int, ProxyStatus]:
    return {p.port: ProxyStatus(p.status) for p in broker.proxies()}


@pytest_twisted.ensureDeferred
async def test_crawl_survives_a_banned_and_a_dead_proxy(
    crawl: Crawl, target: Any, proxy_trio: Any, proxy_kit: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    banned, good, _ = proxy_trio
    dead = proxy_kit.dead()
    target.ban(banned.outbound_ip)
    broker = LeaseBroker.from_proxies([banned.url, good.url, dead.url], acquire_timeout=5)
    brokers.append(broker)
    crawler = await crawl(Pages, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, base=target.url, n=300)
    spider = crawler.spider
    assert isinstance(spider, Pages)
    assert spider.errors == []
    assert sorted(int(item["url"].split("/page/")[1].split("?")[0]) for item in spider.items) == list(range(300))
    assert {item["proxy"] for item in spider.items} == {good.safe_url}
    states = status_by_port(broker)
    # The ban is the site's verdict: the proxy stays active for other sites.
    assert states == {banned.port: ProxyStatus.ACTIVE, good.port: ProxyStatus.ACTIVE, dead.port: ProxyStatus.INACTIVE}
    assert broker.health(site=target.url).site_banned == 1
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/moved"] >= 2
    assert stats["pharox/moved/ban"] >= 1 and stats["pharox/moved/failure"] >= 1
    assert stats["pharox/bans"] >= 1 and stats["pharox/failures"] >= 3
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 300 + stats["pharox/moved"]
    assert "pharox/leases/released_at_close" not in stats
    assert stats["pharox/verdict/ok/200"] == 300
    assert stats["pharox/verdict/ban/403"] == target.hits[banned.outbound_ip]
    assert_auth_only_to_its_proxy(target, proxy_trio)
    assert_no_leases(broker)
    assert_no_secret(debug_logs.text, stats, [r.getMessage() for r in debug_logs.records])


@pytest_twisted.ensureDeferred
async def test_proxy_killed_mid_crawl_loses_nothing(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    victim = proxy_trio[0]

    class KillingPages(Pages):
        def parse(self, response: Response) -> Any:
            if len(self.items) == 40:
                victim.kill()  # a crash mid-crawl: refused/reset connections from now on
            yield from super().parse(response)

    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker), "CONCURRENT_REQUESTS": 32}
    crawler = await crawl(KillingPages, settings, base=target.url, n=200)
    spider = crawler.spider
    assert isinstance(spider, Pages)
    assert spider.errors == []
    assert len({item["url"] for item in spider.items}) == 200
    assert status_by_port(broker)[victim.port] == ProxyStatus.INACTIVE
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_https_through_connect_on_an_authenticated_proxy(
    crawl: Crawl, tls_target: Any, auth_http_proxy: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    broker = LeaseBroker.from_proxies([auth_http_proxy.url])
    brokers.append(broker)
    urls = [(f"{tls_target.url}/echo?i={i}", {}) for i in range(5)]
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert spider.errors == []
    assert len(spider.responses) == 5
    for response in spider.responses:
        seen = echo(response)
        assert seen["tls"] is True
        assert seen["peer_ip"] == auth_http_proxy.outbound_ip
        assert "proxy-authorization" not in {h.lower() for h in seen["headers"]}
        assert response.meta["pharox_proxy"] == auth_http_proxy.safe_url
        assert_no_secret(response.meta.get("proxy"), response.meta)
    assert not tls_target.saw_header("Proxy-Authorization")
    assert_no_leases(broker)
    assert_no_secret(debug_logs.text)


@pytest.fixture
def recording_proxy() -> Any:
    """A "proxy" that records what it receives: the target server answers absolute-form
    requests too, so it shows exactly the headers a proxy without auth would get."""
    server = TargetServer()
    yield server
    server.close()


@pytest_twisted.ensureDeferred
async def test_moving_to_a_proxy_without_auth_drops_the_old_header(
    crawl: Crawl,
    target: Any,
    auth_http_proxy: Any,
    recording_proxy: TargetServer,
    brokers: list[LeaseBroker],
    debug_logs: Any,
) -> None:
    """Scrapy's HttpProxyMiddleware must drop Proxy-Authorization of the first proxy."""
    target.ban(auth_http_proxy.outbound_ip)
    entries = [auth_http_proxy.url, f"http://127.0.0.1:{recording_proxy.port}"]
    broker = LeaseBroker.from_proxies(entries, selector="first_available")
    brokers.append(broker)
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, requests=[(f"{target.url}/echo", {})])
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert [r.status for r in spider.responses] == [200]
    seen = echo(spider.responses[0])  # what the second proxy received
    assert seen["peer_ip"] == "127.0.0.1" and seen["query"] == ""
    assert len(recording_proxy.requests) == 1
    assert not recording_proxy.saw_header("Proxy-Authorization")
    assert target.hits[auth_http_proxy.outbound_ip] == 1  # it did go through the banned one first
    assert crawler.stats.get_value("pharox/moved/ban") == 1  # type: ignore[union-attr]
    assert_no_leases(broker)
    assert_no_secret(debug_logs.text)


@pytest_twisted.ensureDeferred
async def test_sticky_session_keeps_one_proxy(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    urls = [(f"{target.url}/echo?i={i}", {"pharox_session": "account-1"}) for i in range(12)]
    urls += [(f"{target.url}/echo?j={i}", {}) for i in range(12)]
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    sticky = {r.meta["pharox_proxy"] for r in spider.responses if "pharox_session" in r.meta}
    rotated = {r.meta["pharox_proxy"] for r in spider.responses if "pharox_session" not in r.meta}
    assert len(sticky) == 1
    assert len(rotated) == 3
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_spider_set_proxy_and_dont_proxy_are_left_alone(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    mine, other = proxy_trio[0], proxy_trio[2]
    broker = LeaseBroker.from_proxies([mine.url])
    brokers.append(broker)
    urls = [
        (f"{target.url}/echo?own", {"proxy": other.url}),
        (f"{target.url}/echo?direct", {"dont_proxy": True}),
        (f"{target.url}/echo?none", {"proxy": None}),
        (f"{target.url}/echo?leased", {}),
    ]
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    by_query = {echo(r)["query"]: r for r in spider.responses}
    assert echo(by_query["own"])["peer_ip"] == other.outbound_ip
    assert echo(by_query["direct"])["peer_ip"] == "127.0.0.1"
    assert echo(by_query["none"])["peer_ip"] == "127.0.0.1"
    assert echo(by_query["leased"])["peer_ip"] == mine.outbound_ip
    assert [q for q, r in by_query.items() if "pharox_proxy" in r.meta] == ["leased"]
    assert crawler.stats.get_value("pharox/leases/acquired") == 1  # type: ignore[union-attr]
    assert_no_leases(broker)


class DropSome:
    """A later middleware (650) that ignores `?drop` requests and re-issues `?swap` ones."""

    def process_request(self, request: Request, spider: object = None) -> Request | None:
        if "drop" in request.url:
            raise IgnoreRequest("dropped by a later middleware")
        if "swap=" in request.url:
            # A new request carrying the old meta (lease included) replaces this one.
            return request.replace(url=request.url.replace("swap=", "swapped="))
        return None


@pytest_twisted.ensureDeferred
async def test_no_leak_on_redirects_ignores_replacements_and_timeouts(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio], policy=HealthPolicy(max_failures=100))
    brokers.append(broker)
    urls = [(f"{target.url}/redirect?to=/echo%3Fr%3D{i}", {}) for i in range(6)]
    urls += [(f"{target.url}/echo?drop={i}", {}) for i in range(4)]
    urls += [(f"{target.url}/echo?swap={i}", {}) for i in range(4)]
    urls += [(f"{target.url}/slow?ms=3000&t={i}", {"download_timeout": 0.5, "pharox_max_moves": 1}) for i in range(2)]
    settings = {
        "PHAROX_BROKER": scrapy_brokers.use(broker),
        "DOWNLOADER_MIDDLEWARES": {
            "pharox_integrations.scrapy.PharoxProxyMiddleware": 610,
            f"{__name__}.DropSome": 650,
        },
    }
    crawler = await crawl(Urls, settings, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    queries = Counter(echo(r)["query"].split("=")[0] for r in spider.responses)
    assert queries == {"r": 6, "swapped": 4}
    assert all(len(r.meta["redirect_urls"]) == 1 for r in spider.responses if "r=" in r.url)
    errors = Counter(type(f.value).__name__ for f in spider.errors)
    for failure in spider.errors:  # dropped at 650, before HttpProxyMiddleware turned the URL into a header
        assert_no_secret(failure.request.meta)
    assert errors == {"IgnoreRequest": 4, "AllProxiesFailed": 2}, errors  # the timed-out ones: both proxies failed
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"]
    assert stats["pharox/moved/failure"] == 2  # each timed-out request tried one other proxy
    assert "pharox/leases/released_at_close" not in stats
    assert_no_leases(broker)


class StopEarly(Pages):
    """Closes the spider while slow downloads are in flight."""

    async def start(self) -> Any:
        for i in range(20):
            yield Request(f"{self.base}/slow?ms=4000&i={i}", dont_filter=True, errback=self.failed)
        yield Request(f"{self.base}/echo", callback=self.stop, dont_filter=True, priority=-1)

    def stop(self, response: Response) -> None:
        from scrapy.exceptions import CloseSpider

        raise CloseSpider("enough")


@pytest_twisted.ensureDeferred
async def test_spider_close_with_downloads_in_flight_releases_everything(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    crawler = await crawl(StopEarly, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, base=target.url, n=0)
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["finish_reason"] == "enough"
    assert stats["pharox/leases/acquired"] == 21
    released_at_close = stats.get("pharox/leases/released_at_close", 0)
    assert stats["pharox/leases/released"] == 21
    assert released_at_close + stats.get("pharox/verdict/ok/200", 0) <= 21
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_leases_held_at_close_are_released_and_counted(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    """A lease the engine never settles (a middleware swallowing it) is released at close."""

    class Swallow:
        def process_request(self, request: Request, spider: object = None) -> Response:
            exchange = request.meta.pop("_pharox_exchange")  # bypasses process_response's release
            assert isinstance(exchange, Exchange)
            return Response(request.url, status=200, request=request)

    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings = {
        "PHAROX_BROKER": scrapy_brokers.use(broker),
        "DOWNLOADER_MIDDLEWARES": {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610, Swallow: 650},
    }
    crawler = await crawl(Urls, settings, requests=[(f"{target.url}/echo?{i}", {}) for i in range(3)])
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/leases/released_at_close"] == 3
    assert "released 3 lease(s) still held at spider close" in debug_logs.text
    assert_no_leases(broker)


class Captcha:
    """PHAROX_BAN_POLICY: a body-based ban, as people write for scrapy-rotating-proxies."""

    def response_is_ban(self, request: Request, response: Response) -> bool | None:
        return b"slept_ms" in response.body or None

    def exception_is_ban(self, request: Request, exception: BaseException) -> bool | None:
        return None


class Lenient(Urls):
    def response_is_ban(self, request: Request, response: Response) -> bool:
        return False  # the spider knows 403 here is the site's answer, not a ban


@pytest_twisted.ensureDeferred
async def test_ban_policy_and_spider_hooks(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings = {
        "PHAROX_BROKER": scrapy_brokers.use(broker),
        "PHAROX_BAN_POLICY": f"{__name__}.Captcha",
        "PHAROX_MAX_MOVES": 1,
        "HTTPERROR_ALLOW_ALL": True,
    }
    crawler = await crawl(Urls, settings, requests=[(f"{target.url}/slow?ms=1", {})])
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/verdict/ban/200"] == 2 and stats["pharox/moved/ban"] == 1
    assert stats["pharox/moved/gave_up"] == 1
    assert broker.health(site=target.url).site_banned == 2
    assert_no_leases(broker)

    broker2 = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker2)
    settings["PHAROX_BROKER"] = scrapy_brokers.use(broker2)
    crawler = await crawl(Lenient, settings, requests=[(f"{target.url}/status/403", {})])
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/verdict/target_error/403"] == 1
    assert "pharox/moved" not in stats
    assert all(p.status == ProxyStatus.ACTIVE for p in broker2.proxies())
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert [r.status for r in spider.responses] == [403]


class BrokenHook(Urls):
    def response_is_ban(self, request: Request, response: Response) -> bool:
        raise RuntimeError("ban hook bug")


@pytest_twisted.ensureDeferred
async def test_a_failing_ban_hook_still_gives_the_proxy_back(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker)}
    urls = [(f"{target.url}/echo?{i}", {}) for i in range(3)]
    crawler = await crawl(BrokenHook, settings, requests=urls)
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    spider = crawler.spider
    assert isinstance(spider, BrokenHook)
    assert len(spider.errors) == 3 and not spider.responses  # the hook's error reached the spider
    assert all("ban hook bug" in str(f.value) for f in spider.errors)
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 3
    # Given back with the failed response, not found later by the sweeper or at close.
    assert "pharox/leases/released_at_close" not in stats
    assert "pharox/leases/released_orphaned" not in stats
    assert broker.counters["acquired"] == broker.counters["released"] == 3
    assert_no_leases(broker)


class OwnSlot(Spider):
    name = "slots"

    def __init__(self, base: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base
        self.slots: list[tuple[str, str]] = []

    async def start(self) -> Any:
        for i in range(6):
            yield Request(f"{self.base}/echo?{i}", dont_filter=True)
        yield Request(f"{self.base}/echo?mine", meta={"download_slot": "mine"}, dont_filter=True)

    def parse(self, response: Response) -> None:
        self.slots.append((response.meta["download_slot"], response.meta["pharox_proxy"]))


@pytest_twisted.ensureDeferred
async def test_each_proxy_gets_its_own_download_slot(
    crawl: Crawl, target: Any, proxy_trio: Any, http_proxy: Any, brokers: list[LeaseBroker]
) -> None:
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio] + [http_proxy.url])
    brokers.append(broker)
    crawler = await crawl(OwnSlot, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, base=target.url)
    spider = crawler.spider
    assert isinstance(spider, OwnSlot)
    slots = dict(spider.slots)
    assert "mine" in slots  # the spider's own slot is kept
    ours = {slot: proxy for slot, proxy in spider.slots if slot != "mine"}
    assert len(ours) == 4
    for slot, proxy in ours.items():
        assert slot.startswith(proxy)  # the proxy's own slot: its safe URL, an id for accounts
        assert_no_secret(slot)
    assert_no_leases(broker)


class RaiseOnResponse:
    """A middleware at 650 whose process_response raises for `?gone` (ours never sees it)."""

    def process_response(self, request: Request, response: Response, spider: object = None) -> Response:
        if "gone" in request.url:
            raise IgnoreRequest("dropped after download")
        return response


class QuickSweep(PharoxProxyMiddleware):
    orphan_sweep_seconds = 0.2


class Follower(Urls):
    """Re-requests each page with a copy of its meta and dont_proxy (a common spider idiom)."""

    def parse(self, response: Response) -> Any:
        super().parse(response)
        if "copy" not in response.url:
            meta = {**response.meta, "dont_proxy": True}
            yield Request(response.url + "&copy=1", meta=meta, dont_filter=True, errback=self.failed)


@pytest_twisted.ensureDeferred
async def test_orphaned_leases_are_swept_and_copied_meta_with_dont_proxy_goes_direct(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    urls = [(f"{target.url}/echo?gone={i}", {}) for i in range(3)]
    urls += [(f"{target.url}/slow?ms=700&i={i}", {}) for i in range(2)]
    settings = {
        "PHAROX_BROKER": scrapy_brokers.use(broker),
        "DOWNLOADER_MIDDLEWARES": {f"{__name__}.QuickSweep": 610, RaiseOnResponse: 650},
    }
    crawler = await crawl(Follower, settings, requests=urls)
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/leases/released_orphaned"] == 3
    assert "pharox/leases/released_at_close" not in stats
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 5
    spider = crawler.spider
    assert isinstance(spider, Follower)
    copies = [r for r in spider.responses if "copy=1" in r.url]
    assert len(copies) == 2
    assert target.hits["127.0.0.1"] == 2  # the copies went direct
    assert all("pharox_proxy" not in r.meta for r in copies)
    assert_no_leases(broker)
    assert_no_secret(debug_logs.text)


@pytest_twisted.ensureDeferred
async def test_scrapys_retry_middleware_still_handles_target_errors(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    """A 503 is the site's doing: no move, RetryMiddleware retries it, on a fresh lease."""
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    order = []
    for _ in range(3):  # learn the round-robin cycle, so the next two picks get 503s
        with broker.lease() as lease:
            order.append(lease.port)
    by_port = {p.port: p for p in proxy_trio}
    for port in order[:2]:
        target.ban(by_port[port].outbound_ip, status=503)
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker), "RETRY_ENABLED": True, "RETRY_TIMES": 2}
    crawler = await crawl(Urls, settings, requests=[(f"{target.url}/echo", {})])
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/verdict/target_error/503"] == stats["retry/count"] == 2
    assert "pharox/moved" not in stats
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 3
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert [r.status for r in spider.responses] == [200]
    assert echo(spider.responses[0])["peer_ip"] == by_port[order[2]].outbound_ip
    assert all(p.status == ProxyStatus.ACTIVE for p in broker.proxies())
    assert_no_leases(broker)


class _Cycle:
    """A reference cycle: only the collector can free it."""

    def __init__(self) -> None:
        self.me = self


@pytest_twisted.ensureDeferred
async def test_a_crawl_keeps_its_start_up_objects_out_of_the_collector_until_it_closes(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    assert gc.get_freeze_count() == 0
    before = _Cycle()  # exists when the spider opens
    before_ref = weakref.ref(before)
    seen: dict[str, Any] = {}

    class Watching(Pages):
        def parse(self, response: Response) -> Any:
            if len(self.items) == 5:
                nonlocal before
                before = None  # type: ignore[assignment]  # now garbage, in a cycle
                during = _Cycle()
                during_ref = weakref.ref(during)
                del during
                gc.collect()
                seen.update(frozen=gc.get_freeze_count(), before=before_ref() is not None, during=during_ref())
            yield from super().parse(response)

    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    crawler = await crawl(Watching, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, base=target.url, n=30)
    assert isinstance(crawler.spider, Pages) and len(crawler.spider.items) == 30
    assert seen["frozen"] > 0
    assert seen["before"] is True  # frozen: the collector did not walk it during the crawl
    assert seen["during"] is None  # what the crawl makes is collected as before
    assert gc.get_freeze_count() == 0  # given back at close
    gc.collect()
    assert before_ref() is None


@pytest_twisted.ensureDeferred
async def test_gc_freeze_off_or_a_process_that_froze_itself_is_left_alone(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    counts: list[int] = []

    class Counting(Pages):
        def parse(self, response: Response) -> Any:
            counts.append(gc.get_freeze_count())
            yield from super().parse(response)

    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker)}
    await crawl(Counting, {**settings, "PHAROX_GC_FREEZE": "false"}, base=target.url, n=10)
    assert counts and set(counts) == {0}
    counts.clear()
    gc.freeze()  # the process manages its collector itself
    try:
        own = gc.get_freeze_count()
        await crawl(Counting, settings, base=target.url, n=10)
        # Not frozen further (that would add the crawl's thousands of objects; frozen
        # objects freed by their reference counts leave), and not unfrozen at close.
        assert counts and max(counts) <= own
        assert 0 < gc.get_freeze_count() <= own
    finally:
        gc.unfreeze()


def test_crawls_of_one_process_share_the_freeze_and_the_last_gives_it_back() -> None:
    assert gc.get_freeze_count() == 0
    try:
        assert freeze_start_up() and freeze_start_up()  # two crawls open
        assert gc.get_freeze_count() > 0
        unfreeze_start_up()  # the first closes: still frozen (the count drops only by the
        assert gc.get_freeze_count() > 0  # frozen objects freed by their reference counts)
        unfreeze_start_up()  # the last closes
        assert gc.get_freeze_count() == 0
        unfreeze_start_up()  # one close too many changes nothing
        assert gc.get_freeze_count() == 0
        gc.disable()
        assert not freeze_start_up()  # the process runs its collector itself
        assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
        gc.unfreeze()
