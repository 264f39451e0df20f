"""Set-up and edges of the Scrapy door: settings, exhausted pools, health log, other reactors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import scrapy_brokers
from conftest import Crawl, assert_no_leases, middleware_of
from scrapy_spiders import Urls, assert_no_secret, echo

from pharox_integrations import ConfigurationError, LeaseBroker
from pharox_integrations.scrapy import PharoxProxyMiddleware

pytestmark = pytest.mark.filterwarnings("error::scrapy.exceptions.ScrapyDeprecationWarning")


@pytest_twisted.ensureDeferred
async def test_not_configured_says_which_setting_to_add(crawl: Crawl, target: Any, debug_logs: Any) -> None:
    crawler = await crawl(Urls, {}, requests=[(f"{target.url}/echo", {})])
    assert crawler.engine is None or not any(
        isinstance(m, PharoxProxyMiddleware) for m in crawler.engine.downloader.middleware.middlewares
    )
    assert "PharoxProxyMiddleware disabled: set PHAROX_PROXIES" in debug_logs.text
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert echo(spider.responses[0])["peer_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"PHAROX_MAX_MOVES": "many"}, "PHAROX_MAX_MOVES='many': expected an integer"),
        ({"PHAROX_ON_EXHAUSTED": "wait"}, "PHAROX_ON_EXHAUSTED='wait': expected one of close_spider, ignore_request"),
        ({"PHAROX_RETRIES": 3}, "unknown setting PHAROX_RETRIES"),
        ({"PHAROX_BAN_POLICY": "no.such.Policy"}, "PHAROX_BAN_POLICY='no.such.Policy': cannot import it"),
        ({"PHAROX_BAN_POLICY": "json.dumps"}, "has neither response_is_ban"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_settings_stop_the_crawl_at_start_up(
    crawl: Crawl, target: Any, proxy_trio: Any, settings: dict[str, Any], message: str
) -> None:
    settings = {"PHAROX_PROXIES": [p.url for p in proxy_trio], **settings}
    with pytest.raises(ConfigurationError) as caught:
        await crawl(Urls, settings, requests=[(f"{target.url}/echo", {})])
    assert message in str(caught.value)
    assert target.hits == {}
    assert_no_secret(caught.value)


@pytest_twisted.ensureDeferred
async def test_an_unknown_pool_stops_the_crawl_at_start_up_naming_the_pools(
    crawl: Crawl, target: Any, tmp_path: Any
) -> None:
    from pharox_integrations import LeaseBroker
    from pharox_integrations.storage.sql import init_schema

    url = f"sqlite:///{tmp_path}/pool.db"
    init_schema(url)
    LeaseBroker.from_settings({"PHAROX_STORAGE_URL": url, "PHAROX_POOL": "shop", "PHAROX_PROXIES": "http://a:1"}).close()
    with pytest.raises(ConfigurationError, match=r"PHAROX_POOL='shpo': no such pool .*\(pools there: 'shop'\)"):
        await crawl(Urls, {"PHAROX_STORAGE_URL": url, "PHAROX_POOL": "shpo"}, requests=[(f"{target.url}/echo", {})])
    assert target.hits == {}


@pytest_twisted.ensureDeferred
async def test_proxies_from_settings_rotate_and_are_released(
    crawl: Crawl, target: Any, proxy_trio: Any, debug_logs: Any
) -> None:
    settings = {"PHAROX_PROXIES": "\n".join(p.url for p in proxy_trio), "PHAROX_LOGSTATS_INTERVAL": 0.2}
    urls = [(f"{target.url}/slow?ms=150&i={i}", {}) for i in range(9)]
    crawler = await crawl(Urls, {**settings, "CONCURRENT_REQUESTS": 1}, requests=urls)
    broker = middleware_of(crawler).broker
    assert_no_leases(broker)
    assert {target.hits[p.outbound_ip] for p in proxy_trio} == {3}
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"] == 9
    assert stats["pharox/leases/peak_active"] == 1
    health = [r.getMessage() for r in debug_logs.records if r.getMessage().startswith("pharox: pool 'default'")]
    assert health, "no periodic health line"
    assert "3/3 active" in health[-1] and "held by this crawl" in health[-1]
    with pytest.raises(RuntimeError, match="closed"):  # the middleware's own broker closes with the spider
        broker.acquire()
    assert_no_secret(debug_logs.text, stats)


@pytest_twisted.ensureDeferred
async def test_exhausted_pool_closes_the_spider(
    crawl: Crawl, target: Any, http_proxy: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    broker = LeaseBroker.from_proxies([http_proxy.url], max_concurrency=1, acquire_timeout=0.3)
    brokers.append(broker)
    urls = [(f"{target.url}/slow?ms=1500&i={i}", {}) for i in range(4)]
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, requests=urls)
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["finish_reason"] == "pharox_no_proxies"
    assert stats["pharox/no_proxy_available"] >= 1
    assert "no proxy available, closing the spider: 0 of 1 proxies available in pool 'default'" in debug_logs.text
    assert target.hits[http_proxy.outbound_ip] <= 2 and target.hits["127.0.0.1"] == 0  # never without a proxy
    assert_no_leases(broker)


@pytest_twisted.ensureDeferred
async def test_socks_only_pool_fails_with_the_reason(
    crawl: Crawl, target: Any, socks5_proxy: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    broker = LeaseBroker.from_proxies([socks5_proxy.url], acquire_timeout=0.2)
    brokers.append(broker)
    urls = [(f"{target.url}/echo?{i}", {}) for i in range(3)]
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker), "PHAROX_ON_EXHAUSTED": "ignore_request"}
    crawler = await crawl(Urls, settings, requests=urls)
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["finish_reason"] == "finished"
    assert stats["pharox/no_proxy_available"] == 3
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert spider.responses == [] and len(spider.errors) == 3
    assert "cannot speak (socks5; it speaks http, https)" in str(spider.errors[0].value)
    assert target.hits == {}
    assert_no_secret(debug_logs.text, spider.errors[0].value)


@pytest_twisted.ensureDeferred
async def test_without_scrapys_httpproxy_middleware_the_door_sets_the_header(
    crawl: Crawl, target: Any, tls_target: Any, auth_http_proxy: Any, brokers: list[LeaseBroker], debug_logs: Any
) -> None:
    broker = LeaseBroker.from_proxies([auth_http_proxy.url])
    brokers.append(broker)
    urls = [(f"{target.url}/echo", {}), (f"{tls_target.url}/echo", {})]
    settings = {"PHAROX_BROKER": scrapy_brokers.use(broker), "HTTPPROXY_ENABLED": False}
    crawler = await crawl(Urls, settings, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    assert sorted(echo(r)["tls"] for r in spider.responses) == [False, True]
    assert {echo(r)["peer_ip"] for r in spider.responses} == {auth_http_proxy.outbound_ip}
    assert all(r.meta["proxy"] == auth_http_proxy.safe_url for r in spider.responses)
    assert not tls_target.saw_header("Proxy-Authorization")
    assert_no_leases(broker)
    assert_no_secret(debug_logs.text)


_EPOLL_CRAWL = textwrap.dedent(
    """
    import json, sys
    from scrapy import Request, Spider
    from scrapy.crawler import CrawlerProcess

    target, extra, proxies = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]

    class S(Spider):
        name = "s"
        seen = []
        errors = []
        async def start(self):
            for i in range(12):
                yield Request(f"{target}/slow?ms=200&i={i}", dont_filter=True, errback=self.failed)
        def parse(self, response):
            self.seen.append(response.meta["pharox_proxy"])
        def failed(self, failure):
            self.errors.append(type(failure.value).__name__)

    process = CrawlerProcess({
        "TWISTED_REACTOR": "twisted.internet.epollreactor.EPollReactor",
        "DOWNLOADER_MIDDLEWARES": {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610},
        "PHAROX_PROXIES": proxies, "PHAROX_ACQUIRE_TIMEOUT": 20,
        "CONCURRENT_REQUESTS": 6, "TELNETCONSOLE_ENABLED": False, "LOG_LEVEL": "WARNING", **extra,
    })
    crawler = process.create_crawler(S)
    process.crawl(crawler)
    process.start()
    from twisted.internet import reactor
    stats = crawler.stats.get_stats()
    print(json.dumps({"reactor": type(reactor).__name__, "seen": S.seen, "errors": S.errors,
                      "acquired": stats.get("pharox/leases/acquired"),
                      "released": stats.get("pharox/leases/released"),
                      "moved": stats.get("pharox/moved", 0),
                      "peak": stats.get("pharox/leases/peak_active")}))
    """
)


def _epoll_crawl(tmp_path: Path, target: Any, proxies: list[str], **extra: Any) -> dict[str, Any]:
    script = tmp_path / "crawl_epoll.py"
    script.write_text(_EPOLL_CRAWL)
    done = subprocess.run(
        [sys.executable, str(script), target.url, json.dumps(extra), *proxies],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_secret(done.stdout, done.stderr)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reactor"] == "EPollReactor"
    assert result["acquired"] == result["released"]
    return result


def test_non_asyncio_reactor_waits_in_a_thread(tmp_path: Path, target: Any, proxy_trio: Any) -> None:
    """On another reactor a full pool (max 1 lease per proxy) is waited for off the reactor."""
    result = _epoll_crawl(tmp_path, target, [p.url for p in proxy_trio], PHAROX_MAX_CONCURRENCY=1)
    assert len(result["seen"]) == 12 and result["errors"] == []
    assert result["acquired"] == 12
    assert result["peak"] == 3  # six concurrent requests, three proxies of one lease each: the rest waited


def test_non_asyncio_reactor_moves_off_banned_and_dead_proxies(
    tmp_path: Path, target: Any, proxy_trio: Any, proxy_kit: Any
) -> None:
    banned, good, other = proxy_trio
    target.ban(banned.outbound_ip)
    dead = proxy_kit.dead()
    result = _epoll_crawl(tmp_path, target, [banned.url, dead.url, good.url, other.url])
    assert len(result["seen"]) == 12 and result["errors"] == []
    assert set(result["seen"]) <= {good.safe_url, other.safe_url}
    assert result["moved"] >= 2
    assert result["acquired"] == 12 + result["moved"]


def test_non_asyncio_reactor_every_proxy_dead(tmp_path: Path, target: Any, proxy_kit: Any) -> None:
    result = _epoll_crawl(tmp_path, target, [proxy_kit.dead().url for _ in range(2)], PHAROX_MAX_FAILURES=100)
    assert result["seen"] == [] and result["errors"] == ["AllProxiesFailed"] * 12
    assert result["acquired"] == 24


@pytest_twisted.ensureDeferred
async def test_per_request_pool_and_filters(
    crawl: Crawl, target: Any, proxy_trio: Any, brokers: list[LeaseBroker]
) -> None:
    default, other, american = proxy_trio
    broker = LeaseBroker.from_proxies([default.url])
    broker.add_proxies([other.url], pool="other")
    broker.add_proxies([american.url], country="US")
    brokers.append(broker)
    urls = [
        (f"{target.url}/echo?pool", {"pharox_pool": "other"}),
        (f"{target.url}/echo?us", {"pharox_filters": {"country": "US"}}),
        *[(f"{target.url}/echo?any{i}", {}) for i in range(4)],
    ]
    crawler = await crawl(Urls, {"PHAROX_BROKER": scrapy_brokers.use(broker)}, requests=urls)
    spider = crawler.spider
    assert isinstance(spider, Urls)
    peers = {echo(r)["query"]: echo(r)["peer_ip"] for r in spider.responses}
    assert peers.pop("pool") == other.outbound_ip
    assert peers.pop("us") == american.outbound_ip
    assert set(peers.values()) == {default.outbound_ip, american.outbound_ip}
    assert_no_leases(broker, "default", "other")
