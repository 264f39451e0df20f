"""Selection (pharox_integrations/selection.py): which proxy a request gets, and the wait for one."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from brokerhelpers import URLS, assert_nothing_held, make
from pharox import InMemoryStorage, ProxyFilters

from pharox_integrations import HealthPolicy, LeaseBroker, NoProxyAvailable
from pharox_integrations.broker import HTTP_PROTOCOLS


def test_round_robin_rotates_over_every_proxy() -> None:
    broker = make()
    seen = []
    for _ in range(6):
        with broker.lease() as lease:
            seen.append(lease.safe_url)
    assert Counter(seen) == {u: 2 for u in set(seen)} and len(set(seen)) == 3
    assert_nothing_held(broker)


def test_acquire_nowait_answers_at_once() -> None:
    broker = make(URLS[:1], max_concurrency=1, acquire_timeout=5.0)
    lease = broker.acquire_nowait()
    assert lease is not None and broker.held == 1
    started = time.monotonic()
    assert broker.acquire_nowait() is None  # full: no wait for the 5 s acquire timeout
    assert time.monotonic() - started < 2.5  # half the timeout: it did not wait for it
    assert broker.acquire_nowait(protocols={"socks5"}) is None  # nothing of that protocol
    broker.finish(lease, 200)
    again = broker.acquire_nowait()
    assert again is not None and again.proxy_id == lease.proxy_id
    broker.release(again)
    assert_nothing_held(broker)


def test_protocols_restrict_to_what_the_client_speaks() -> None:
    broker = make()
    for _ in range(6):
        with broker.lease(protocols=HTTP_PROTOCOLS) as lease:
            assert lease.protocol.value == "http"
    only_socks = make(["socks5://127.0.0.9:1080"])
    with pytest.raises(
        NoProxyAvailable, match=r"1 use a protocol this client cannot speak \(socks5; it speaks http, https\)"
    ):
        only_socks.acquire(protocols=HTTP_PROTOCOLS, timeout=0)


def test_exhausted_pool_waits_then_names_pool_filters_and_counts() -> None:
    broker = make(max_concurrency=1, pool="shop")
    held = [broker.acquire() for _ in range(3)]
    # No proxy matches the filters: nothing can come, so no waiting at all.
    start = time.monotonic()
    with pytest.raises(NoProxyAvailable) as info:
        broker.acquire(filters=ProxyFilters(country="US"), timeout=5)
    assert time.monotonic() - start < 1.0  # generous: ~0.1 ms here
    message = str(info.value)
    assert "pool 'shop'" in message and "country='US'" in message and "3 filtered out" in message
    assert info.value.pool == "shop"
    # Every proxy busy: one may be released, so the caller waits its whole timeout.
    start = time.monotonic()
    with pytest.raises(NoProxyAvailable, match=r"0 of 3 proxies available in pool 'shop': 3 leased to capacity"):
        broker.acquire(timeout=0.25)
    assert time.monotonic() - start >= 0.25
    # A proxy released while someone waits is picked up by the waiter.
    threading.Timer(0.1, broker.release, args=(held[0],)).start()
    lease = broker.acquire(timeout=2)
    assert lease.proxy_id == held[0].proxy_id
    for h in [lease, *held[1:]]:
        broker.release(h)
    assert_nothing_held(broker)


def test_unknown_pool_says_which_pools_exist_at_once() -> None:
    broker = make(pool="shop")
    start = time.monotonic()
    with pytest.raises(NoProxyAvailable, match=r"pool 'nope' does not exist \(pools in this storage: 'shop'\)"):
        broker.acquire(pool="nope", timeout=30)
    assert time.monotonic() - start < 1.0  # generous: no wait at all


def test_all_benched_past_the_deadline_fails_at_once_and_says_when() -> None:
    broker = make(URLS[:2], policy=HealthPolicy(backoff_base=60, backoff_cap=60))
    for _ in range(2):
        with broker.lease() as lease:
            broker.report(lease, status_code=403)
    start = time.monotonic()
    expected = r"all 2 proxies of pool 'default' benched: 2 banned; next back in \d+ s"
    with pytest.raises(NoProxyAvailable, match=expected):
        broker.acquire(timeout=30)
    assert time.monotonic() - start < 1.0  # generous: the broker knows none is back within 30 s
    assert_nothing_held(broker)


def test_a_proxy_back_before_the_deadline_is_waited_for() -> None:
    broker = make(URLS[:1], policy=HealthPolicy(backoff_base=0.3, backoff_cap=0.3), revive_scan_seconds=0.1)
    with broker.lease() as lease:
        broker.report(lease, status_code=403)
    start = time.monotonic()
    lease = broker.acquire(timeout=5)
    assert 0.2 <= time.monotonic() - start < 4.0  # back after its 0.3 s cool-down
    broker.release(lease)
    assert_nothing_held(broker)


@pytest.mark.parametrize("selector", ["first_available", "least_used", "round_robin"])
def test_avoid_never_hands_out_a_tried_proxy(selector: str) -> None:
    """A request that moves never gets a proxy it tried, whatever the selector (the
    non-rotating ones pick the tried proxy again every time they are asked)."""
    broker = make(selector=selector)
    first = broker.acquire()
    broker.release(first)
    again = broker.acquire(avoid={first.proxy_id})
    assert again.proxy_id != first.proxy_id
    third = broker.acquire(avoid={first.proxy_id, again.proxy_id})
    assert third.proxy_id not in {first.proxy_id, again.proxy_id}
    broker.release(again)
    broker.release(third)
    assert broker.peak_held == 2
    assert broker.counters["acquired"] == broker.counters["released"] == 3  # the passed-over pick is not one
    assert_nothing_held(broker)


def test_only_tried_proxies_left_fails_at_once() -> None:
    """Nothing but tried proxies: no waiting for the acquire timeout, and the reason says so."""
    lonely = make(URLS[:1], acquire_timeout=30)
    only = lonely.acquire()
    lonely.release(only)
    started = time.monotonic()
    with pytest.raises(NoProxyAvailable, match="1 already tried by this request"):
        lonely.acquire(avoid={only.proxy_id})
    assert time.monotonic() - started < 1.0  # generous: measured ~1 ms here
    assert_nothing_held(lonely)


def test_a_tried_proxy_picked_by_the_selector_goes_back_when_the_storage_then_fails() -> None:
    """The selector picks a tried proxy, the scan for another then fails in the storage
    (fault injection: no real storage fails on demand): the picked lease goes back.
    pharox's own storage: ours pass over tried proxies as they pick, with no scan."""
    broker = make(selector="first_available", storage="pharox-memory://")
    first = broker.acquire()
    broker.release(first)

    def broken(pool_id: str) -> list[object]:
        raise RuntimeError("storage unavailable")

    broker.storage.list_proxies = broken  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(RuntimeError, match="storage unavailable"):
            broker.acquire(avoid={first.proxy_id})
    finally:
        del broker.storage.list_proxies
    assert broker.peak_held == 1
    assert_nothing_held(broker)


def test_sticky_session_keeps_its_proxy_until_benched() -> None:
    broker = make(URLS[:2], policy=HealthPolicy(backoff_base=60))
    first = broker.acquire(session="account-42")
    broker.release(first)
    for _ in range(5):
        with broker.lease(session="account-42") as lease:
            assert lease.proxy_id == first.proxy_id
    with broker.lease(session="account-42") as lease:
        broker.report(lease, status_code=403)
    with broker.lease(session="account-42") as lease:
        assert lease.proxy_id != first.proxy_id


def test_races_inside_pharox_storage_are_retried_not_surfaced() -> None:
    """pharox's InMemoryStorage finds and leases in two steps: 8 threads on 4 single-slot
    proxies race for real; no ProxyUnavailableError may reach the caller."""
    urls = [f"http://127.0.0.{i}:80" for i in range(1, 5)]
    broker = LeaseBroker.from_proxies(urls, storage=InMemoryStorage(), max_concurrency=1, acquire_timeout=10)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(100):
                with broker.lease() as lease:
                    broker.report(lease, status_code=200)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert broker.counters["acquired"] == broker.counters["released"] == 800
    assert_nothing_held(broker)

