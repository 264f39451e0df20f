"""Per-site standing in the core: site keys, Retry-After, holds, and what selection does
with them (memory storage, no network; the doors' tests go through real proxies in
test_contract.py and the shared storages in test_sites_store.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from pharox_integrations import ConfigurationError, HealthPolicy, LeaseBroker, NoProxyAvailable
from pharox_integrations.health import Verdict
from pharox_integrations.sites import BAN, COOLDOWN, DELAY, retry_after, site_of, site_of_host

PROXIES = [f"http://10.9.0.{i}:8080" for i in range(1, 5)]
A, B = "http://shop.example/items", "https://www.news.example.co.uk/today"


@pytest.fixture
def brokers() -> Iterator[list[LeaseBroker]]:
    made: list[LeaseBroker] = []
    yield made
    for broker in made:
        broker.close()


def make(brokers: list[LeaseBroker], n: int = 4, **kw: object) -> LeaseBroker:
    kw.setdefault("acquire_timeout", 0.5)
    broker = LeaseBroker.from_proxies(PROXIES[:n], **kw)  # type: ignore[arg-type]
    brokers.append(broker)
    return broker


class _Answer:
    def __init__(self, **headers: str | bytes) -> None:
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


# ---------------------------------------------------------------------- site keys


@pytest.mark.parametrize(
    ("url", "domain", "host"),
    [
        ("https://www.shop.example.co.uk/a?b=1", "example.co.uk", "www.shop.example.co.uk"),
        ("http://a.b.github.io/", "b.github.io", "a.b.github.io"),  # a private suffix counts
        ("http://user:pw@Shop.Example:8080/x", "shop.example", "shop.example"),
        ("http://127.0.0.8:4443/", "127.0.0.8", "127.0.0.8"),  # an address is its own site
        ("http://[::1]:80/", "::1", "::1"),
        ("http://localhost:8000/", "localhost", "localhost"),
    ],
)
def test_site_keys(url: str, domain: str, host: str) -> None:
    assert site_of(url) == domain
    assert site_of(url, "host") == host


def test_no_host_no_site() -> None:
    assert site_of(None) is None and site_of("") is None and site_of("/relative/path") is None
    assert site_of_host("WWW.Shop.Example.") == "shop.example"


def test_retry_after_in_seconds_dates_and_bytes() -> None:
    assert retry_after(_Answer(Retry_After="7")) == 7.0
    assert retry_after(_Answer(Retry_After=b"3")) == 3.0  # Scrapy's headers are bytes
    now = time.time()
    later = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=90)
    assert retry_after(_Answer(Retry_After=format_datetime(later, usegmt=True)), now) == pytest.approx(90, abs=1)
    past = datetime.fromtimestamp(now, timezone.utc) - timedelta(seconds=90)
    assert retry_after(_Answer(Retry_After=format_datetime(past, usegmt=True)), now) == 0.0
    assert retry_after(_Answer(Retry_After="soon")) is None
    assert retry_after(_Answer()) is None and retry_after(object()) is None


def test_bad_site_settings_are_one_clear_line() -> None:
    with pytest.raises(ConfigurationError, match=r"site_scope='path': expected one of domain, host"):
        LeaseBroker.from_proxies(PROXIES[:1], site_scope="path")
    with pytest.raises(ConfigurationError, match=r"site_delay=-1: expected a number of seconds >= 0"):
        LeaseBroker.from_proxies(PROXIES[:1], site_delay=-1)
    with pytest.raises(ConfigurationError, match=r"PHAROX_SITE_SCOPE='url': expected one of domain, host"):
        LeaseBroker.from_settings({"PHAROX_PROXIES": PROXIES[:1], "PHAROX_SITE_SCOPE": "url"})
    broker = LeaseBroker.from_settings(
        {"PHAROX_PROXIES": PROXIES[:1], "PHAROX_SITE_DELAY": "0.25", "PHAROX_SITE_BANS_TO_BENCH": "2"}
    )
    assert (broker.sites.delay, broker.sites.bans_to_bench, broker.sites.scope) == (0.25, 2, "domain")
    broker.close()


# ---------------------------------------------------------------------- bans per site


def test_a_ban_holds_the_pair_and_the_proxy_keeps_serving_other_sites(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=2)
    lease = broker.acquire(A)
    banned = lease.proxy_id
    assert lease.site == "shop.example"
    broker.finish(lease, status_code=403)
    assert {p.status for p in broker.proxies()} == {"active"}  # not benched anywhere
    for _ in range(6):  # site A never gets it again during its cool-down
        with broker.lease(A) as other:
            assert other.proxy_id != banned
    seen_b = set()
    for _ in range(4):  # site B does (round robin over both)
        with broker.lease(B) as lease_b:
            seen_b.add(lease_b.proxy_id)
    assert banned in seen_b
    hold = broker.sites.holds("shop.example")[banned]
    assert hold.kind == BAN and hold.strikes == 1
    assert 29 <= hold.until - time.time() <= 30  # strike 1: backoff_base (jitter grows with the strikes)
    assert broker.counters["site_bans"] == 1 and broker.counters["benched"] == 0
    health = broker.health(site="www.shop.example")
    assert (health.site, health.site_banned, health.site_cooling, health.site_usable) == ("shop.example", 1, 0, 1)
    assert "site 'shop.example': 1 usable, 1 banned there, 0 cooling" in str(health)


def test_the_same_pair_banned_again_waits_longer(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=1, policy=HealthPolicy(backoff_base=0.2, backoff_cap=60))
    lasted = []
    for _ in range(3):
        deadline = time.time() + 5
        while True:  # wait out the previous hold
            try:
                lease = broker.acquire(A, timeout=5)
                break
            except NoProxyAvailable:
                assert time.time() < deadline
        broker.finish(lease, status_code=403)
        hold = broker.sites.holds("shop.example")[lease.proxy_id]
        lasted.append((hold.strikes, hold.until - time.time()))
    assert [s for s, _ in lasted] == [1, 2, 3]
    assert lasted[0][1] <= 0.2 + 0.01 and lasted[2][1] <= 0.8 + 0.01  # ceilings: base x 2^(strikes-1)


def test_a_proxy_banned_by_enough_sites_is_benched_everywhere(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=1, site_bans_to_bench=3)
    for i, url in enumerate(["http://a.example/", "http://b.example/", "http://c.example/"]):
        lease = broker.acquire(url)
        broker.finish(lease, status_code=403)
        expected = "banned" if i == 2 else "active"
        assert [p.status for p in broker.proxies()] == [expected]
    assert broker.counters["benched"] == 1


def test_a_ban_without_a_site_still_benches_the_proxy(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=1)
    broker.finish(broker.acquire(), status_code=403)
    assert [p.status for p in broker.proxies()] == ["banned"]


def test_no_proxy_for_a_site_names_it_and_says_when(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=3)
    for _ in range(2):
        broker.finish(broker.acquire(A), status_code=403)
    broker.finish(broker.acquire(A), status_code=429, response=_Answer(Retry_After="7"))
    started = time.monotonic()
    with pytest.raises(NoProxyAvailable) as caught:
        broker.acquire(A, timeout=0.5)
    assert time.monotonic() - started < 0.5  # the earliest is back in 7 s: said at once
    text = str(caught.value)
    assert text.startswith("0 of 3 proxies usable for site 'shop.example' in pool 'default': 2 banned there, next in")
    assert "; 1 cooling, next in 7.0 s" in text or "; 1 cooling, next in 6.9 s" in text, text
    assert caught.value.site == "shop.example"
    assert caught.value.next_usable_in == pytest.approx(7, abs=0.2)
    assert "\n" not in text
    with broker.lease(B):  # another site is not slowed at all
        pass


# ---------------------------------------------------------------------- cool-downs


def test_retry_after_keeps_the_proxy_off_that_site_for_that_long_and_no_longer(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=1)
    lease = broker.acquire(A)
    verdict = broker.finish(lease, status_code=429, response=_Answer(Retry_After="1"))
    assert verdict is Verdict.COOLDOWN
    hold = broker.sites.holds("shop.example")[lease.proxy_id]
    assert hold.kind == COOLDOWN and hold.strikes == 0  # not a strike
    assert broker.counters["site_cooldowns"] == 1 and broker.counters["site_bans"] == 0
    with broker.lease(B):  # no other site is affected
        pass
    with pytest.raises(NoProxyAvailable):
        broker.acquire(A, timeout=0)
    started = time.monotonic()
    with broker.lease(A, timeout=3) as again:  # waited for, since it is back within the deadline
        waited = time.monotonic() - started
    assert again.proxy_id == lease.proxy_id
    assert 0.8 <= waited <= 1.6, waited  # the hold ends 1 s after the answer (loose upper bound: a shared CI box)


def test_retry_after_is_capped(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=1, policy=HealthPolicy(backoff_base=1, backoff_cap=5))
    lease = broker.acquire(A)
    broker.finish(lease, status_code=503, response=_Answer(Retry_After="86400"))
    assert broker.sites.holds("shop.example")[lease.proxy_id].until - time.time() == pytest.approx(5, abs=0.1)


# ---------------------------------------------------------------------- politeness


def test_site_delay_spaces_one_proxys_visits_to_one_site_only(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=1, site_delay=0.3)
    times = []
    for _ in range(3):
        with broker.lease(A, timeout=2):
            times.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.3 - 0.005 for gap in gaps), gaps  # monotonic vs wall clock: a few ms
    started = time.monotonic()
    with broker.lease(B, timeout=2):  # another site is not spaced by A's visits
        pass
    assert time.monotonic() - started < 0.1
    assert broker.sites.holds("shop.example").popitem()[1].kind == DELAY


def test_a_sticky_session_waits_for_its_proxys_next_polite_visit(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=3, site_delay=0.2)
    with broker.lease(A, session="account-1") as first:
        pass
    with broker.lease(A, session="account-1", timeout=2) as second:
        pass
    assert second.proxy_id == first.proxy_id


def test_expired_pairs_are_forgotten(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=2, site_delay=0.01)
    for i in range(50):
        with broker.lease(f"http://site{i}.example/"):
            pass
    store = broker.sites.store
    time.sleep(0.05)
    assert store.purge(time.time()) == 50  # delay holds carry no strikes: gone when over
    assert store.in_force(time.time()) == []


def test_bans_of_requests_in_flight_add_no_strike_and_nothing_shortens_a_hold(brokers: list[LeaseBroker]) -> None:
    broker = make(brokers, n=1)
    in_flight = [broker.acquire(A) for _ in range(3)]  # no max_concurrency: all through one proxy
    for lease in in_flight:
        broker.finish(lease, status_code=403)
    pid = in_flight[0].proxy_id
    hold = broker.sites.holds("shop.example")[pid]
    assert (hold.kind, hold.strikes) == (BAN, 1)  # one ban, seen three times
    lease = broker.acquire(B)
    lease.site = "shop.example"  # an answer from that site arriving late, through this lease
    broker.finish(lease, status_code=429, response=_Answer(Retry_After="1"))
    after = broker.sites.holds("shop.example")[pid]
    assert after.kind == BAN and after.until == hold.until  # still banned, not merely paused
