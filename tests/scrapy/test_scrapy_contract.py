"""The door contract in real crawls: every proxy bans, every proxy fails, 407, the move budget."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import scrapy_brokers
from conftest import Crawl, assert_no_leases
from pharox import ProxyStatus
from scrapy import Request
from scrapy.core.scheduler import Scheduler
from scrapy.http import Response
from scrapy_spiders import Urls, assert_no_secret, echo

from pharox_integrations import AllProxiesFailed, LeaseBroker, ProxyAuthenticationFailed

pytestmark = pytest.mark.filterwarnings("error::scrapy.exceptions.ScrapyDeprecationWarning")


class GoesOn(Urls):
    """After the first answer, fetches one more page directly: the spider is still open."""

    def parse(self, response: Response) -> Any:
        super().parse(response)
        if "after" not in response.url:
            yield Request(f"{response.url.split('/status')[0]}/echo?after", meta={"dont_proxy": True})


@pytest.mark.parametrize("allowed", ["HTTPERROR_ALLOW_ALL", "handle_httpstatus_list"])
@pytest_twisted.ensureDeferred
async def test_every_proxy_bans_the_callback_gets_the_last_ban(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker], allowed: str, debug_logs: Any
) -> None:
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings: dict[str, Any] = {"PHAROX_BROKER": scrapy_brokers.use(broker)}
    meta: dict[str, Any] = {}
    if allowed == "HTTPERROR_ALLOW_ALL":
        settings["HTTPERROR_ALLOW_ALL"] = True
    else:
        meta["handle_httpstatus_list"] = [403]
    crawler = await crawl(GoesOn, settings, requests=[(f"{target.url}/status/200", meta)])
    spider = crawler.spider
    assert isinstance(spider, GoesOn)
    assert spider.errors == []
    banned, after = spider.responses
    assert banned.status == 403
    assert echo(after)["query"] == "after"  # the spider kept crawling after the bans
    assert {target.hits[p.outbound_ip] for p in proxy_trio} == {1}  # each proxy tried once
    assert banned.meta["pharox_proxy"] in {p.safe_url for p in proxy_trio}
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["finish_reason"] == "finished"
    assert "pharox/no_proxy_available" not in stats
    assert stats["pharox/verdict/ban/403"] == 3
    assert stats["pharox/moved/ban"] == 2 and stats["pharox/moved/gave_up"] == 1
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 3
    assert all(p.status == ProxyStatus.ACTIVE for p in broker.proxies())  # the site's verdict only
    assert broker.health(site=target.url).site_banned == 3 and stats["pharox/site/bans"] == 3
    assert_no_leases(broker)
    assert_no_secret(debug_logs.text, banned.meta)


@pytest_twisted.ensureDeferred
async def test_every_proxy_dead_the_errback_gets_all_proxies_failed(
    crawl: Crawl, target: Any, proxy_kit: Any, brokers: list[LeaseBroker]
) -> None:
    dead = [proxy_kit.dead() for _ in range(3)]
    broker = LeaseBroker.from_proxies([d.url for d in dead])
    brokers.append(broker)
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, requests=[(f"{target.url}/echo", {})])
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert spider.responses == []
    [failure] = spider.errors
    error = failure.value
    assert isinstance(error, AllProxiesFailed) and not isinstance(error, ProxyAuthenticationFailed)
    message = str(error)
    assert "\n" not in message and " object at 0x" not in message
    for proxy in dead:
        assert message.count(f"{proxy.url}:") == 1, message  # each proxy named once
    assert [a.outcome for a in error.attempts] == ["failure"] * 3
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["finish_reason"] == "finished"
    assert stats["pharox/moved/failure"] == 2 and stats["pharox/moved/gave_up"] == 1
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 3
    assert [broker.proxy_stats(p.id)["failures"] for p in broker.proxies()] == [1, 1, 1]  # health recorded
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_a_407_from_the_proxy_moves_the_request(
    crawl: Crawl, target: Any, tls_target: Any, auth_http_proxy: Any, http_proxy: Any, brokers: list[LeaseBroker]
) -> None:
    """Wrong credentials: a plain-HTTP 407 answer and a refused CONNECT (TunnelError) both move."""
    refusing = f"http://wrong:creds@127.0.0.1:{auth_http_proxy.port}"
    broker = LeaseBroker.from_proxies([refusing, http_proxy.url], selector="first_available")
    brokers.append(broker)
    urls = [(f"{target.url}/echo", {}), (f"{tls_target.url}/echo", {})]
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker), "CONCURRENT_REQUESTS": 1}, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert spider.errors == []
    assert sorted(echo(r)["tls"] for r in spider.responses) == [False, True]
    assert {echo(r)["peer_ip"] for r in spider.responses} == {http_proxy.outbound_ip}
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/verdict/failure/407"] == 1
    assert stats["pharox/verdict/failure/TunnelError"] == 1
    assert stats["pharox/moved/failure"] == 2
    refused = next(p for p in broker.proxies() if p.port == auth_http_proxy.port)
    assert broker.proxy_stats(refused.id)["failures"] == 2
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_a_407_with_nothing_left_is_proxy_authentication_failed(
    crawl: Crawl, target: Any, tls_target: Any, auth_http_proxy: Any, brokers: list[LeaseBroker]
) -> None:
    broker = LeaseBroker.from_proxies([f"http://wrong:creds@127.0.0.1:{auth_http_proxy.port}"])
    brokers.append(broker)
    urls = [(f"{target.url}/echo", {}), (f"{tls_target.url}/echo", {})]
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker), "CONCURRENT_REQUESTS": 1}, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert spider.responses == []
    assert [type(f.value) for f in spider.errors] == [ProxyAuthenticationFailed] * 2
    for failure in spider.errors:
        assert "407" in str(failure.value) and "creds" not in str(failure.value)
    assert crawler.stats.get_value("pharox/moved/gave_up") == 2  # type: ignore[union-attr]
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_max_moves_per_request_and_setting(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker), "PHAROX_MAX_MOVES": 1, "HTTPERROR_ALLOW_ALL": True}
    urls = [(f"{target.url}/echo?a", {"pharox_max_moves": 0}), (f"{target.url}/echo?b", {})]
    crawler = await crawl(Urls, {**settings, "CONCURRENT_REQUESTS": 1}, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert [r.status for r in spider.responses] == [403, 403]
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/verdict/ban/403"] == 3  # a: one proxy; b: one move, two proxies
    assert stats["pharox/moved/ban"] == 1 and stats["pharox/moved/gave_up"] == 2
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_old_names_warn_and_still_work(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    """PHAROX_RETRY_TIMES and meta["pharox_retry_times"] still set the move budget, with a warning."""
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio])
    brokers.append(broker)
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker), "PHAROX_RETRY_TIMES": 1, "HTTPERROR_ALLOW_ALL": True}
    urls = [(f"{target.url}/echo?a", {"pharox_retry_times": 0}), (f"{target.url}/echo?b", {})]
    with pytest.warns(DeprecationWarning) as warned:
        crawler = await crawl(Urls, {**settings, "CONCURRENT_REQUESTS": 1}, requests=urls)
    texts = {str(w.message).split(":")[0] for w in warned if issubclass(w.category, DeprecationWarning)}
    assert texts == {"PHAROX_RETRY_TIMES is deprecated", 'meta["pharox_retry_times"] is deprecated'}
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/verdict/ban/403"] == 3
    assert stats["pharox/moved/ban"] == 1 and stats["pharox/moved/gave_up"] == 2
    assert_no_leases(broker)


class RefuseMoved(Scheduler):
    """A scheduler that refuses requests the middleware moved (they carry its exchange)."""

    def enqueue_request(self, request: Request) -> bool:
        if "_pharox_exchange" in request.meta:
            return False
        return bool(super().enqueue_request(request))


@pytest_twisted.ensureDeferred
async def test_a_moved_request_the_scheduler_drops_gives_its_lease_back(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    target.ban(proxy_trio[0].outbound_ip)
    broker = LeaseBroker.from_proxies([p.url for p in proxy_trio], selector="first_available")
    brokers.append(broker)
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker), "SCHEDULER": f"{__name__}.RefuseMoved"}
    crawler = await crawl(Urls, settings, requests=[(f"{target.url}/echo", {})])
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/moved/ban"] == 1
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 2
    assert "pharox/leases/released_at_close" not in stats  # given back when dropped, not at close
    assert_no_leases(broker)
