"""The Scrapy door on a shared PostgreSQL pool: works, and never queries on the reactor thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from conftest import Crawl, assert_no_leases
from pharox import ProxyStatus
from scrapy import signals
from scrapy_spiders import Pages, assert_auth_only_to_its_proxy, assert_no_secret
from sqlhelpers import private_database

from pharox_integrations import LeaseBroker
from pharox_integrations.storage.sql import init_schema

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("error::scrapy.exceptions.ScrapyDeprecationWarning"),
]


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with private_database("postgres", tmp_path) as url:
        init_schema(url)  # what `pharox-integrations db init --storage URL` does
        yield url


class QueryThreads:
    """Records which thread runs each SQL statement while the crawl is open.

    Uses SQLAlchemy's public event hook on every Engine (removed afterwards); a
    statement on the main thread (the reactor's) while the spider is open fails the test.
    """

    def __init__(self) -> None:
        self.open = False
        self.on_reactor: list[str] = []
        self.off_reactor = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not self.open:
            return
        if threading.current_thread() is threading.main_thread():
            self.on_reactor.append(statement.split()[0] + " " + statement[:80])
        else:
            self.off_reactor += 1


@pytest_twisted.ensureDeferred
async def test_crawl_on_a_postgres_pool_stays_off_the_reactor(
    crawl: Crawl, target: Any, proxy_trio: Any, proxy_kit: Any, postgres_url: str, debug_logs: Any
) -> None:
    banned = proxy_trio[0]
    dead = proxy_kit.dead()
    target.ban(banned.outbound_ip)
    queries = QueryThreads()
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", queries)

    class Watched(Pages):
        @classmethod
        def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> Any:
            spider = super().from_crawler(crawler, *args, **kwargs)
            spider.watch = (lambda: setattr(queries, "open", True), lambda: setattr(queries, "open", False))
            crawler.signals.connect(spider.watch[0], signal=signals.spider_opened)  # receivers are weak refs
            crawler.signals.connect(spider.watch[1], signal=signals.engine_stopped)
            return spider

    settings = {
        "PHAROX_STORAGE_URL": postgres_url,
        "PHAROX_PROXIES": [p.url for p in proxy_trio] + [dead.url],
        "PHAROX_LOGSTATS_INTERVAL": 0.3,
        "CONCURRENT_REQUESTS": 8,
    }
    try:
        crawler = await crawl(Watched, settings, base=f"{target.url}", n=60)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", queries)
    spider = crawler.spider
    assert isinstance(spider, Pages)
    assert spider.errors == []
    assert len({item["url"] for item in spider.items}) == 60
    assert queries.on_reactor == []
    assert queries.off_reactor > 0  # with lease blocks, a few per slot rather than per request
    stats = crawler.stats.get_stats()  # type: ignore[union-attr]
    assert stats["pharox/leases/acquired"] == stats["pharox/leases/released"]
    assert stats["pharox/moved/ban"] >= 1 and stats["pharox/moved/failure"] >= 3
    assert "pharox/leases/released_at_close" not in stats
    # A second process's view of the shared pool: nothing leased, the banned one held
    # off this site (and active for others), the dead one benched.
    with LeaseBroker.from_settings({"PHAROX_STORAGE_URL": postgres_url}) as observer:
        assert_no_leases(observer)
        states = {p.port: ProxyStatus(p.status) for p in observer.proxies()}
        assert states[dead.port] == ProxyStatus.INACTIVE
        assert sum(s == ProxyStatus.ACTIVE for s in states.values()) == 3
        held = observer.sites.holds(observer.sites.site_of_name(target.url))
        assert [p.port for p in observer.proxies() if p.id in held] == [banned.port]
        observer.storage.engine.dispose()  # type: ignore[attr-defined]
    assert_auth_only_to_its_proxy(target, proxy_trio)
    assert_no_secret(debug_logs.text, stats)
