"""The same situation gets the same answer from every door.

One suite, parametrized over the doors (requests, urllib3, httpx sync and async,
Scrapy), through real proxies to a real target that records what it received.  The
rules are the core's `Exchange` table; each door only translates its client's events,
so a failure here names the door that translates wrongly.

Sync doors run in a worker thread and Scrapy in a real crawl, all from one Twisted
test, so a single test body describes the situation for every door.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_twisted
import requests
import urllib3
from twisted.internet import threads

from pharox_integrations import (
    AllProxiesFailed,
    HealthPolicy,
    LeaseBroker,
    NoProxyAvailable,
    ProxyAuthenticationFailed,
    ReportFailed,
)
from pharox_integrations.httpx import AsyncPharoxTransport, PharoxTransport
from pharox_integrations.requests import pharox_session
from pharox_integrations.urllib3 import PharoxProxyManager

if __package__:
    from .servers import SPECIAL_AUTH, KitProxy, TargetServer
else:
    from servers import SPECIAL_AUTH, KitProxy, TargetServer

BAD_AUTH = ("us@r:na/me", "wr@ng:p/w %+ y")
SECRETS = [SPECIAL_AUTH[1], quote(SPECIAL_AUTH[1], safe=""), BAD_AUTH[1], quote(BAD_AUTH[1], safe="")]
TIMEOUT = 10.0


@dataclass
class Result:
    """What the caller got: an answer, or an error."""

    status: int | None = None
    body: bytes = b""
    error: BaseException | None = None

    def raised(self) -> BaseException:
        assert self.error is not None, f"expected an error, got HTTP {self.status}"
        return self.error


class Door:
    name = ""
    #: the client's own error family every AllProxiesFailed must also belong to
    family: tuple[type[BaseException], ...] = ()
    #: the client's proxy-error type a ProxyAuthenticationFailed must also be
    proxy_family: tuple[type[BaseException], ...] = ()
    streams_bodies = True  # can send generator / file bodies

    async def fetch(self, broker: LeaseBroker, url: str, **kw: Any) -> Result:
        return await threads.deferToThread(self.fetch_sync, broker, url, **kw)  # type: ignore[no-any-return]

    def fetch_sync(self, broker: LeaseBroker, url: str, **kw: Any) -> Result:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class RequestsDoor(Door):
    name = "requests"
    family = (requests.ConnectionError,)
    proxy_family = (requests.exceptions.ProxyError,)

    def fetch_sync(
        self, broker: LeaseBroker, url: str, *, method: str = "GET", body: Any = None, ca: str | None = None,
        session: str | None = None, max_moves: int | None = None, timeout: float = TIMEOUT,
    ) -> Result:
        client = pharox_session(broker, session=session, max_moves=max_moves)
        try:
            r = client.request(method, url, data=body, verify=ca or True, timeout=timeout)
            return Result(r.status_code, r.content)
        except Exception as exc:
            return Result(error=exc)
        finally:
            client.close()


class Urllib3Door(Door):
    name = "urllib3"
    family = (urllib3.exceptions.HTTPError,)
    proxy_family = (urllib3.exceptions.HTTPError,)

    def fetch_sync(
        self, broker: LeaseBroker, url: str, *, method: str = "GET", body: Any = None, ca: str | None = None,
        session: str | None = None, max_moves: int | None = None, timeout: float = TIMEOUT,
    ) -> Result:
        tls = {"ca_certs": ca} if ca else {}
        manager = PharoxProxyManager(broker, session=session, max_moves=max_moves, **tls)
        try:
            r = manager.request(method, url, body=body, timeout=timeout, retries=False)
            return Result(r.status, r.data)
        except Exception as exc:
            return Result(error=exc)
        finally:
            manager.clear()


class HttpxDoor(Door):
    name = "httpx"
    family = (httpx.TransportError,)
    proxy_family = (httpx.ProxyError,)

    def fetch_sync(
        self, broker: LeaseBroker, url: str, *, method: str = "GET", body: Any = None, ca: str | None = None,
        session: str | None = None, max_moves: int | None = None, timeout: float = TIMEOUT,
    ) -> Result:
        transport = PharoxTransport(broker, max_moves=max_moves, verify=_verify(ca))
        options = {"pharox": {"session": session}} if session else None
        with httpx.Client(transport=transport, timeout=timeout) as client:
            try:
                r = client.request(method, url, content=body, extensions=options)
                return Result(r.status_code, r.content)
            except Exception as exc:
                return Result(error=exc)


class AsyncHttpxDoor(HttpxDoor):
    name = "httpx-async"

    def fetch_sync(self, broker: LeaseBroker, url: str, **kw: Any) -> Result:
        return asyncio.run(self._fetch(broker, url, **kw))

    async def _fetch(
        self, broker: LeaseBroker, url: str, *, method: str = "GET", body: Any = None, ca: str | None = None,
        session: str | None = None, max_moves: int | None = None, timeout: float = TIMEOUT,
    ) -> Result:
        if isinstance(body, Iterator):
            body = _async_iter(body)
        transport = AsyncPharoxTransport(broker, max_moves=max_moves, verify=_verify(ca))
        options = {"pharox": {"session": session}} if session else None
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            try:
                r = await client.request(method, url, content=body, extensions=options)
                return Result(r.status_code, r.content)
            except Exception as exc:
                return Result(error=exc)


def _verify(ca: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca) if ca else True


async def _async_iter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class ScrapyDoor(Door):
    name = "scrapy"
    family = (Exception,)  # Scrapy hands the error to the errback as it is
    proxy_family = (Exception,)
    streams_bodies = False  # a Scrapy request body is bytes

    async def fetch(
        self, broker: LeaseBroker, url: str, *, method: str = "GET", body: Any = None, ca: str | None = None,
        session: str | None = None, max_moves: int | None = None, timeout: float = TIMEOUT,
    ) -> Result:
        from scrapy.crawler import CrawlerRunner
        from twisted.internet import reactor

        cls = type(reactor)
        meta: dict[str, Any] = {"handle_httpstatus_all": True, "download_timeout": timeout}
        if session:
            meta["pharox_session"] = session
        if max_moves is not None:
            meta["pharox_max_moves"] = max_moves
        runner = CrawlerRunner(
            {
                "TWISTED_REACTOR": f"{cls.__module__}.{cls.__name__}",
                "DOWNLOADER_MIDDLEWARES": {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610},
                "PHAROX_BROKER": _use(broker),
                "TELNETCONSOLE_ENABLED": False,
                "ROBOTSTXT_OBEY": False,
                "RETRY_ENABLED": False,
                "DOWNLOAD_TIMEOUT": TIMEOUT,
                "PHAROX_LOGSTATS_INTERVAL": 0,
                "LOG_LEVEL": "INFO",
            }
        )
        crawler = runner.create_crawler(_OneRequest)
        await runner.crawl(crawler, url=url, method=method, body=body, meta=meta)
        spider = crawler.spider
        assert isinstance(spider, _OneRequest)
        return spider.result


_current: list[LeaseBroker] = []


def current_broker() -> LeaseBroker:
    """What PHAROX_BROKER names (Scrapy deep-copies settings: the broker goes by import path)."""
    return _current[0]


def _use(broker: LeaseBroker) -> str:
    _current[:] = [broker]
    return f"{__name__}.current_broker"


def _one_request_spider() -> type:
    from scrapy import Request, Spider

    class OneRequest(Spider):
        name = "contract"

        def __init__(self, url: str, method: str, body: bytes | None, meta: dict[str, Any], **kw: Any) -> None:
            super().__init__(**kw)
            self.request = Request(
                url, method=method, body=body, meta=meta, callback=self.got, errback=self.failed, dont_filter=True
            )
            self.result = Result(error=AssertionError("neither callback nor errback ran"))

        async def start(self) -> Any:
            yield self.request

        def got(self, response: Any) -> None:
            self.result = Result(response.status, response.body)

        def failed(self, failure: Any) -> None:
            self.result = Result(error=failure.value)

    return OneRequest


_OneRequest: Any = _one_request_spider()

DOORS = [RequestsDoor(), Urllib3Door(), HttpxDoor(), AsyncHttpxDoor(), ScrapyDoor()]


@pytest.fixture(params=DOORS, ids=lambda d: d.name)
def door(request: pytest.FixtureRequest) -> Door:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def brokers() -> Iterator[list[LeaseBroker]]:
    made: list[LeaseBroker] = []
    yield made
    for broker in made:
        broker.close()


def make_broker(brokers: list[LeaseBroker], urls: list[str], **kw: Any) -> LeaseBroker:
    kw.setdefault("acquire_timeout", 2)
    broker = LeaseBroker.from_proxies(urls, **kw)
    brokers.append(broker)
    return broker


def assert_nothing_held(broker: LeaseBroker) -> None:
    """Every lease released, every lease count back to zero."""
    assert broker.held == 0, broker.held_leases()
    leased = {p.port: p.current_leases for p in broker.proxies() if p.current_leases}
    assert leased == {}, f"proxies still leased: {leased}"


def assert_one_line_no_secret(error: BaseException) -> None:
    text = str(error)
    assert "\n" not in text, text
    assert " object at 0x" not in text, text  # no nested reprs
    for secret in SECRETS:
        assert secret not in text and secret not in repr(error), text


def bad_auth_url(port: int) -> str:
    return f"http://{quote(BAD_AUTH[0], safe='')}:{quote(BAD_AUTH[1], safe='')}@127.0.0.1:{port}"


def bodies_seen(target: TargetServer) -> list[bytes]:
    return [r.body for r in target.requests]


# ---------------------------------------------------------------------- bans


@pytest_twisted.ensureDeferred
async def test_every_proxy_banning_gives_the_last_ban_answer(
    door: Door, target: TargetServer, proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = make_broker(brokers, [p.url for p in proxy_trio])
    result = await door.fetch(broker, f"{target.url}/echo", max_moves=5)
    assert result.error is None, repr(result.error)
    assert (result.status, result.body) == (403, b"banned\n")
    assert {ip: n for ip, n in target.hits.items()} == {p.outbound_ip: 1 for p in proxy_trio}  # each once
    assert broker.counters["bans"] == 3
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_a_ban_moves_the_request_to_another_proxy(
    door: Door, target: TargetServer, proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    banned, good, _ = proxy_trio
    target.ban(banned.outbound_ip)
    broker = make_broker(brokers, [banned.url, good.url])
    statuses = [(await door.fetch(broker, f"{target.url}/echo")).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert target.hits[banned.outbound_ip] <= 1 and target.hits[good.outbound_ip] == 3
    # The ban is the site's verdict: the proxy stays active for every other site.
    assert {p.port: p.status for p in broker.proxies()} == {banned.port: "active", good.port: "active"}
    assert broker.health(site=target.url).site_banned == target.hits[banned.outbound_ip]
    assert_nothing_held(broker)


# ---------------------------------------------------------------------- failures


@pytest_twisted.ensureDeferred
async def test_every_proxy_failing_raises_all_proxies_failed_naming_each_once(
    door: Door, target: TargetServer, proxy_kit: Any, brokers: list[LeaseBroker]
) -> None:
    dead = [proxy_kit.dead(), proxy_kit.dead()]
    broker = make_broker(brokers, [p.url for p in dead])
    error = (await door.fetch(broker, f"{target.url}/echo")).raised()
    assert isinstance(error, AllProxiesFailed) and isinstance(error, door.family), repr(error)
    assert not isinstance(error, ProxyAuthenticationFailed)
    text = str(error)
    for proxy in dead:
        assert text.count(f"127.0.0.1:{proxy.port}") == 1, text
    assert [a.outcome for a in error.attempts] == ["failure", "failure"]
    assert_one_line_no_secret(error)
    assert not target.requests
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_one_dead_proxy_is_tried_once_and_named_once(
    door: Door, target: TargetServer, proxy_kit: Any, brokers: list[LeaseBroker]
) -> None:
    dead = proxy_kit.dead()
    broker = make_broker(brokers, [dead.url])
    error = (await door.fetch(broker, f"{target.url}/echo")).raised()
    assert isinstance(error, AllProxiesFailed) and isinstance(error, door.family), repr(error)
    assert len(error.attempts) == 1 and str(error).count(f"127.0.0.1:{dead.port}") == 1, str(error)
    assert broker.counters["failures"] == 1
    assert_one_line_no_secret(error)
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_the_default_move_budget_is_the_same_in_every_door(
    door: Door, target: TargetServer, proxy_kit: Any, brokers: list[LeaseBroker]
) -> None:
    dead = [proxy_kit.dead() for _ in range(6)]
    broker = make_broker(brokers, [p.url for p in dead])
    error = (await door.fetch(broker, f"{target.url}/echo")).raised()
    assert isinstance(error, AllProxiesFailed), repr(error)
    assert len(error.attempts) == 1 + broker.max_moves == 4  # the first proxy and three moves
    assert len({a.proxy for a in error.attempts}) == 4
    assert_nothing_held(broker)


# ---------------------------------------------------------------------- bodies


@pytest_twisted.ensureDeferred
async def test_a_body_that_cannot_be_replayed_is_never_sent_twice(
    door: Door, target: TargetServer, proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    if not door.streams_bodies:
        pytest.skip("a Scrapy request body is always bytes (replayable)")
    banned, good, _ = proxy_trio
    target.ban(banned.outbound_ip)
    broker = make_broker(brokers, [banned.url, good.url], selector="first_available")
    chunks = [b"order=", b"42&qty=", b"7"]
    result = await door.fetch(broker, f"{target.url}/echo", method="POST", body=iter(chunks))
    assert result.error is None, repr(result.error)
    assert result.status == 403  # not moved: the generator is spent
    assert bodies_seen(target) == [b"order=42&qty=7"]  # sent once, whole
    assert target.hits == {banned.outbound_ip: 1}
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_a_seekable_body_is_rewound_and_moved(
    door: Door, target: TargetServer, proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    if not door.streams_bodies:
        pytest.skip("a Scrapy request body is always bytes")
    if door.name.startswith("httpx"):
        pytest.skip("httpx reads file content as a one-shot iterator (it does not rewind files itself)")
    banned, good, _ = proxy_trio
    target.ban(banned.outbound_ip)
    broker = make_broker(brokers, [banned.url, good.url], selector="first_available")
    body = io.BytesIO(b"skip-me|payload=" + b"x" * 5000)
    body.seek(8)  # the caller's body starts here, as requests and urllib3 honour
    result = await door.fetch(broker, f"{target.url}/echo", method="POST", body=body)
    assert result.error is None, repr(result.error)
    assert result.status == 200
    sent = b"payload=" + b"x" * 5000
    assert json.loads(result.body)["body"] == sent.decode()
    assert bodies_seen(target) == [sent, sent]  # the banning site and the next one: the same bytes
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_a_bytes_body_moves_and_arrives_whole(
    door: Door, target: TargetServer, proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    banned, good, _ = proxy_trio
    target.ban(banned.outbound_ip)
    broker = make_broker(brokers, [banned.url, good.url], selector="first_available")
    sent = b"\x00binary\xffpayload" * 100
    result = await door.fetch(broker, f"{target.url}/echo", method="POST", body=sent)
    assert result.status == 200, repr(result.error)
    assert bodies_seen(target) == [sent, sent]
    assert_nothing_held(broker)


# ---------------------------------------------------------------------- proxy authentication


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_407_is_the_proxys_failure_never_the_sites_answer(
    door: Door,
    scheme: str,
    target: TargetServer,
    tls_target: TargetServer,
    auth_http_proxy: KitProxy,
    http_proxy: KitProxy,
    brokers: list[LeaseBroker],
) -> None:
    site = target if scheme == "http" else tls_target
    wrong = bad_auth_url(auth_http_proxy.port)
    broker = make_broker(brokers, [wrong, http_proxy.url], selector="first_available")
    moved = await door.fetch(broker, f"{site.url}/echo", ca=site.ca_bundle if scheme == "https" else None)
    assert moved.status == 200, repr(moved.error)  # the refusal moved the request
    assert [r.peer_ip for r in site.requests] == [http_proxy.outbound_ip]

    site.reset()
    alone = make_broker(brokers, [wrong])
    error = (await door.fetch(alone, f"{site.url}/echo", ca=site.ca_bundle if scheme == "https" else None)).raised()
    assert isinstance(error, ProxyAuthenticationFailed) and isinstance(error, door.proxy_family), repr(error)
    assert_one_line_no_secret(error)
    assert not site.requests  # the site never saw a thing
    assert_nothing_held(broker)
    assert_nothing_held(alone)


# ---------------------------------------------------------------------- faults of the judge


@pytest_twisted.ensureDeferred
async def test_a_failing_ban_detector_is_one_error_type_and_releases(
    door: Door, target: TargetServer, http_proxy: KitProxy, brokers: list[LeaseBroker]
) -> None:
    def detector(status: int | None, response: Any) -> bool | None:
        raise RuntimeError("detector bug")

    broker = make_broker(brokers, [http_proxy.url], policy=HealthPolicy(ban_detector=detector))
    error = (await door.fetch(broker, f"{target.url}/echo")).raised()
    assert isinstance(error, ReportFailed), repr(error)
    assert "detector bug" in str(error)
    assert {p.status for p in broker.proxies()} == {"active"}
    assert_nothing_held(broker)


# ---------------------------------------------------------------------- per-request choices


@pytest_twisted.ensureDeferred
async def test_a_sticky_session_keeps_its_proxy(
    door: Door, target: TargetServer, proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    broker = make_broker(brokers, [p.url for p in proxy_trio])
    for _ in range(4):
        result = await door.fetch(broker, f"{target.url}/echo", session="account-42")
        assert result.status == 200, repr(result.error)
    assert len(target.hits) == 1 and sum(target.hits.values()) == 4
    rotating = [json.loads((await door.fetch(broker, f"{target.url}/echo")).body)["peer_ip"] for _ in range(3)]
    assert len(set(rotating)) == 3
    assert_nothing_held(broker)


# ---------------------------------------------------------------------- deadlines
#
# Bounds are generous (shared, loaded machines): the figures measured here are in the
# closing note of the deadlines issue.  What matters is the order of magnitude: seconds
# bounded by the caller's timeout, not the 30 s acquire timeout or a 30 s cool-down.


@pytest_twisted.ensureDeferred
async def test_the_only_proxy_banned_answers_at_once_not_after_its_cool_down(
    door: Door, target: TargetServer, http_proxy: KitProxy, brokers: list[LeaseBroker]
) -> None:
    target.ban(http_proxy.outbound_ip)
    broker = make_broker(brokers, [http_proxy.url], acquire_timeout=30)
    started = time.monotonic()
    result = await door.fetch(broker, f"{target.url}/echo", timeout=5)
    assert result.status == 403, repr(result.error)
    assert time.monotonic() - started < 3.0  # measured well under 1 s; it waited 60-90 s before
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_a_pool_benched_for_minutes_says_so_at_once(
    door: Door, target: TargetServer, http_proxy: KitProxy, brokers: list[LeaseBroker]
) -> None:
    broker = make_broker(brokers, [http_proxy.url], acquire_timeout=30, policy=HealthPolicy(backoff_base=120))
    with broker.lease() as lease:
        broker.report(lease, status_code=403)
    started = time.monotonic()
    result = await door.fetch(broker, f"{target.url}/echo", timeout=5)
    elapsed = time.monotonic() - started
    error = result.raised()
    if door.name != "scrapy":  # Scrapy: PHAROX_ON_EXHAUSTED decides (IgnoreRequest by default)
        assert isinstance(error, NoProxyAvailable), repr(error)
    assert "next back in" in str(error), str(error)
    assert elapsed < 3.0  # measured well under 1 s: nothing can come back within 5 s
    assert not target.requests
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_waiting_for_a_busy_proxy_is_bounded_by_the_callers_timeout(
    door: Door, target: TargetServer, http_proxy: KitProxy, brokers: list[LeaseBroker]
) -> None:
    broker = make_broker(brokers, [http_proxy.url], acquire_timeout=30, max_concurrency=1)
    elsewhere = broker.acquire()  # the only proxy, busy with another request
    started = time.monotonic()
    result = await door.fetch(broker, f"{target.url}/echo", timeout=1.5)
    elapsed = time.monotonic() - started
    broker.release(elsewhere)
    error = result.raised()
    if door.name != "scrapy":
        assert isinstance(error, NoProxyAvailable), repr(error)
    assert "leased to capacity" in str(error), str(error)
    assert 1.4 <= elapsed < 3.0  # the caller's 1.5 s, not the broker's 30 s
    assert_nothing_held(broker)


# ---------------------------------------------------------------------- per-site standing
#
# Two real sites on their own loopback addresses (an address is its own site), each
# refusing a proxy by the address the proxy connects from.


def proxy_id(broker: LeaseBroker, proxy: KitProxy) -> Any:
    return next(p.id for p in broker.proxies() if p.port == proxy.port)


@pytest_twisted.ensureDeferred
async def test_a_site_ban_leaves_the_proxy_serving_other_sites(
    door: Door, sites: tuple[TargetServer, TargetServer], proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    site_a, site_b = sites
    banned, good, _ = proxy_trio
    site_a.ban(banned.outbound_ip)
    broker = make_broker(brokers, [banned.url, good.url])
    for _ in range(3):
        assert (await door.fetch(broker, f"{site_a.url}/echo")).status == 200
    for _ in range(4):
        assert (await door.fetch(broker, f"{site_b.url}/echo")).status == 200
    assert site_a.hits[banned.outbound_ip] == 1  # once; then held off site A for its cool-down
    assert site_b.hits[banned.outbound_ip] >= 1  # still serving site B
    assert {p.port: p.status for p in broker.proxies()} == {banned.port: "active", good.port: "active"}
    health = broker.health(site=site_a.url)
    assert (health.site, health.site_banned, health.site_usable) == ("127.0.0.8", 1, 1)
    assert broker.counters["site_bans"] == 1
    assert_nothing_held(broker)


@pytest_twisted.ensureDeferred
async def test_retry_after_keeps_the_proxy_off_that_site_for_that_long_only(
    door: Door, sites: tuple[TargetServer, TargetServer], proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    site_a, site_b = sites
    paused, good, _ = proxy_trio
    site_a.ban(paused.outbound_ip, 429, retry_after="2")
    broker = make_broker(brokers, [paused.url, good.url])
    before = time.time()
    for _ in range(2):  # round robin: one of the two reaches the paused proxy, and moves
        assert (await door.fetch(broker, f"{site_a.url}/echo")).status == 200
    after = time.time()
    assert site_a.hits[paused.outbound_ip] == 1
    hold = broker.sites.holds("127.0.0.8")[proxy_id(broker, paused)]
    assert hold.kind == "cooldown" and hold.strikes == 0
    assert before + 2 <= hold.until <= after + 2  # the 2 s the site asked for, from its answer
    for _ in range(2):
        assert (await door.fetch(broker, f"{site_b.url}/echo")).status == 200
    assert site_b.hits[paused.outbound_ip] == 1  # off no other site
    for _ in range(2):  # still within the 2 s: site A gets the other proxy only
        assert (await door.fetch(broker, f"{site_a.url}/echo")).status == 200
    assert site_a.hits[paused.outbound_ip] == 1 or time.time() >= hold.until
    site_a.unban(paused.outbound_ip)
    await _sleep(max(0.0, hold.until - time.time()) + 0.05)
    for _ in range(2):  # and no longer: round robin reaches it again
        assert (await door.fetch(broker, f"{site_a.url}/echo")).status == 200
    assert site_a.hits[paused.outbound_ip] >= 2
    assert [p.status for p in broker.proxies()] == ["active", "active"]
    assert broker.counters["site_cooldowns"] == 1 and broker.counters["benched"] == 0
    assert_nothing_held(broker)


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor, task

    await task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def test_site_delay_spaces_each_proxys_visits_to_each_site_and_no_site_slows_another(
    door: Door, sites: tuple[TargetServer, TargetServer], proxy_trio: list[KitProxy], brokers: list[LeaseBroker]
) -> None:
    if door.name == "scrapy":
        pytest.skip("one crawl per request here: tests/scrapy/test_sites_crawl.py crawls both sites at once")
    from concurrent.futures import ThreadPoolExecutor

    site_a, site_b = sites
    proxies = proxy_trio[:2]
    broker = make_broker(brokers, [p.url for p in proxies], site_delay=0.5, acquire_timeout=15)

    def run(url: str, n: int) -> list[Result]:
        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(lambda _: door.fetch_sync(broker, url, timeout=15), range(n)))

    with ThreadPoolExecutor(2) as both:
        on_a = both.submit(run, f"{site_a.url}/echo", 10)
        on_b = both.submit(run, f"{site_b.url}/echo", 10)
        results = on_a.result() + on_b.result()
    assert [r.status for r in results] == [200] * 20, [r.error for r in results if r.error]
    for site in sites:
        for proxy in proxies:
            arrivals = sorted(r.at for r in site.requests if r.peer_ip == proxy.outbound_ip)
            gaps = [round(b - a, 3) for a, b in itertools.pairwise(arrivals)]
            # Visit slots are claimed 0.5 s apart when leased; the request reaches the site
            # a few ms later through the proxy (jitter measured under 20 ms on a loaded box).
            assert all(gap >= 0.45 for gap in gaps), (proxy.outbound_ip, gaps)
        # 10 visits over 2 proxies, 0.5 s apart, both sites at once: each site takes what
        # its own spacing needs (2 s) and no more; one spacing shared by both would take 4.5 s.
        times = [r.at for r in site.requests]
        assert 1.9 <= max(times) - min(times) < 3.2, [round(t - min(times), 2) for t in sorted(times)]
    assert_nothing_held(broker)
