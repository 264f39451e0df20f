"""Scrapy door fixtures: the reactor, a crawl runner, and the end-of-test leak check.

Scrapy >= 2.13 runs on the asyncio reactor by default, so these tests want it too.
pytest-twisted installs its reactor in `pytest_configure`; when this directory is
given on the command line (`pytest tests/scrapy`) this conftest is loaded before
that and asks for the asyncio reactor.  Collected as part of a wider run, the tests
use whichever reactor is installed: the middleware supports both.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from brokerhelpers import give_back_kept_slots
from scrapy import Spider
from scrapy.crawler import Crawler, CrawlerRunner

from pharox_integrations import LeaseBroker
from pharox_integrations.scrapy import PharoxProxyMiddleware

MIDDLEWARE = "pharox_integrations.scrapy.PharoxProxyMiddleware"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if "twisted.internet.reactor" not in sys.modules and config.getoption("reactor", None) == "default":
        config.option.reactor = "asyncio"


def installed_reactor_path() -> str:
    from twisted.internet import reactor

    cls = type(reactor)
    return f"{cls.__module__}.{cls.__name__}"


def base_settings(**extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "TWISTED_REACTOR": installed_reactor_path(),
        "DOWNLOADER_MIDDLEWARES": {MIDDLEWARE: 610},
        "TELNETCONSOLE_ENABLED": False,
        "ROBOTSTXT_OBEY": False,
        "LOG_LEVEL": "DEBUG",
        "DOWNLOAD_TIMEOUT": 10,
        "RETRY_ENABLED": False,
        "PHAROX_LOGSTATS_INTERVAL": 0,
        "CONCURRENT_REQUESTS": 16,
    }
    settings.update(extra)
    return settings


Crawl = Callable[..., Awaitable[Crawler]]


@pytest.fixture
def crawl() -> Crawl:
    """`crawler = await crawl(SpiderClass, {settings}, **spider_kwargs)`: one real crawl."""

    async def run(spider_cls: type[Spider], settings: dict[str, Any], **kwargs: Any) -> Crawler:
        runner = CrawlerRunner(base_settings(**settings))
        crawler = runner.create_crawler(spider_cls)
        await runner.crawl(crawler, **kwargs)
        return crawler

    return run


def middleware_of(crawler: Crawler) -> PharoxProxyMiddleware:
    assert crawler.engine is not None
    found = [m for m in crawler.engine.downloader.middleware.middlewares if isinstance(m, PharoxProxyMiddleware)]
    assert len(found) == 1, found
    return found[0]


def assert_no_leases(broker: LeaseBroker, *pools: str) -> None:
    """Nothing held by the broker and nothing leased in the storage."""
    assert broker.held == 0, broker.held_leases()
    give_back_kept_slots(broker)  # a lease block's free slots (shared storage) are not in use
    for pool in pools or (broker.pool,):
        leased = {p.port: p.current_leases for p in broker.proxies(pool) if p.current_leases}
        assert leased == {}, f"proxies still leased in pool {pool!r}: {leased}"


@pytest.fixture
def brokers() -> Iterator[list[LeaseBroker]]:
    """Brokers a test builds are checked for leaks at the end, then closed."""
    made: list[LeaseBroker] = []
    yield made
    for broker in made:
        assert_no_leases(broker)
        broker.close()


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog
