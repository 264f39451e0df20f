"""The leasing core on a real storage, without a network: rotation, waiting, health, revival, release."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import tracemalloc
from collections import Counter

import pytest
from loophelpers import run_in_fresh_loop
from pharox import InMemoryStorage, ProxyFilters, ProxyManager, ProxyStatus

from pharox_integrations import HealthPolicy, LeaseBroker, NoProxyAvailable, Verdict
from pharox_integrations.broker import HTTP_PROTOCOLS
from pharox_integrations.health import strikes_from_records

URLS = ["http://alice:s3cr%20et@127.0.0.1:8001", "http://127.0.0.2:8002", "socks5://bob:hunter2@127.0.0.3:1080"]


def make(urls: list[str] = URLS, **kw: object) -> LeaseBroker:
    kw.setdefault("acquire_timeout", 0.3)
    return LeaseBroker.from_proxies(urls, **kw)  # type: ignore[arg-type]


def statuses(broker: LeaseBroker) -> dict[str, str]:
    return {f"{p.host}:{p.port}": p.status.value for p in broker.proxies()}


def assert_nothing_held(broker: LeaseBroker) -> None:
    assert broker.held == 0
    assert [p.current_leases for p in broker.proxies()] == [0] * len(broker.proxies())


def test_round_robin_rotates_over_every_proxy() -> None:
    broker = make()
    seen = []
    for _ in range(6):
        with broker.lease() as lease:
            seen.append(lease.safe_url)
    assert Counter(seen) == {u: 2 for u in set(seen)} and len(set(seen)) == 3
    assert_nothing_held(broker)


def test_lease_url_keeps_credentials_exactly_and_repr_hides_them() -> None:
    broker = make(URLS[:1])
    lease = broker.acquire()
    assert lease.url == "http://alice:s3cr%20et@127.0.0.1:8001"
    assert (lease.username, lease.password) == ("alice", "s3cr et")
    for text in (repr(lease), str(lease), repr(broker), lease.safe_url):
        assert "s3cr" not in text and "alice" not in text
    broker.release(lease)


def test_release_is_idempotent_and_close_releases_the_rest() -> None:
    broker = make(max_concurrency=1)
    a, _b = broker.acquire(), broker.acquire()
    assert broker.held == 2
    assert broker.release(a) is True and broker.release(a) is False
    assert broker.close() == 1
    assert broker.close() == 0
    assert_nothing_held(broker)
    assert broker.counters["released"] == 2


def test_finish_reports_and_releases_in_one_call_even_when_the_report_fails() -> None:
    broker = make(URLS[:2], max_concurrency=1)
    lease = broker.acquire()
    assert broker.finish(lease, 200, latency_ms=12.0) is Verdict.OK
    assert lease.released and lease.reported and broker.held == 0
    assert broker.proxy_stats(lease.proxy_id)["successes"] == 1
    assert broker.release(lease) is False  # already given back

    banned = broker.acquire()
    assert broker.finish(banned, 403) is Verdict.BAN
    assert statuses(broker)[f"{banned.host}:{banned.port}"] == "banned"

    # Fault injection: a storage that cannot record the bench (no real storage fails on
    # demand).  The proxy must still go back, and the caller must hear of the failure.
    other = broker.acquire()
    storage = broker.storage

    def broken(result: object) -> None:
        raise RuntimeError("storage unavailable")

    storage.apply_health_check_result = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="storage unavailable"):
        broker.finish(other, 429)
    del storage.apply_health_check_result
    assert other.released and broker.held == 0
    assert_nothing_held(broker)
    assert broker.counters["released"] == broker.counters["acquired"] == 3


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
    with pytest.raises(NoProxyAvailable, match=r"all 2 proxies of pool 'default' benched: 2 banned; next back in \d+ s"):
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


def test_ban_benches_at_once_then_revives_after_cooldown() -> None:
    broker = make(URLS[:2], policy=HealthPolicy(backoff_base=0.4, backoff_cap=5))
    lease = broker.acquire()
    banned_id = lease.proxy_id
    assert broker.report(lease, status_code=403) is Verdict.BAN
    broker.release(lease)
    assert ProxyStatus.BANNED in {p.status for p in broker.proxies()}
    # During the cool-down only the other proxy is leased.
    for _ in range(4):
        with broker.lease() as other:
            assert other.proxy_id != banned_id
    time.sleep(0.5)
    back = set()
    for _ in range(4):
        with broker.lease() as again:
            back.add(again.proxy_id)
            broker.report(again, status_code=200)
    assert banned_id in back
    assert all(p.status == ProxyStatus.ACTIVE for p in broker.proxies())
    assert broker.counters["revived"] == 1


def test_repeat_offender_waits_longer() -> None:
    policy = HealthPolicy(backoff_base=0.2, backoff_cap=100)
    broker = make(URLS[:1], policy=policy, acquire_timeout=0)
    pid = broker.proxies()[0].id
    strikes_seen = []
    for _ in range(3):
        lease = broker.acquire(timeout=5)
        broker.report(lease, status_code=429)
        broker.release(lease)
        strikes_seen.append(strikes_from_records(broker.storage.list_health_records(pid, limit=32)))
    assert strikes_seen == [1, 2, 3]
    proxy = broker.proxies()[0]
    # The ceiling doubles per strike; the floor is backoff_base.
    assert policy.cooldown(3, pid, proxy.checked_at) >= 0.2
    assert max(policy.cooldown(5, pid, proxy.checked_at.replace(microsecond=m)) for m in range(50)) > 1.6
    # A success after revival clears the record: the next ban is strike 1 again.
    lease = broker.acquire(timeout=5)
    broker.report(lease, status_code=200)
    broker.release(lease)
    lease = broker.acquire(timeout=0)
    broker.report(lease, status_code=403)
    broker.release(lease)
    assert strikes_from_records(broker.storage.list_health_records(pid, limit=32)) == 1


def test_failures_in_a_row_make_inactive_and_success_resets() -> None:
    broker = make(URLS[:1], policy=HealthPolicy(max_failures=3))
    for outcome in [ConnectionRefusedError(), TimeoutError(), 200, ConnectionResetError(), OSError()]:
        with broker.lease() as lease:
            if isinstance(outcome, int):
                broker.report(lease, status_code=outcome)
            else:
                assert broker.report(lease, error=outcome) is Verdict.FAILURE
    assert broker.proxies()[0].status == ProxyStatus.ACTIVE  # 2 failures, a success, 2 failures
    with broker.lease() as lease:
        broker.report(lease, error=ConnectionRefusedError())
    assert broker.proxies()[0].status == ProxyStatus.INACTIVE


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (200, Verdict.OK),
        (404, Verdict.TARGET_ERROR),
        (500, Verdict.TARGET_ERROR),
        (503, Verdict.TARGET_ERROR),
        (403, Verdict.BAN),
        (429, Verdict.BAN),
        (407, Verdict.FAILURE),
    ],
)
def test_status_code_verdicts(code: int, verdict: Verdict) -> None:
    assert HealthPolicy().judge(code) is verdict


def test_caller_and_certificate_errors_are_not_the_proxys_fault() -> None:
    import ssl

    import requests

    policy = HealthPolicy()
    assert policy.judge(error=requests.exceptions.InvalidURL("bad")) is Verdict.TARGET_ERROR
    assert policy.judge(error=ssl.SSLCertVerificationError("self-signed")) is Verdict.TARGET_ERROR
    assert policy.judge(error=requests.exceptions.ProxyError("tunnel failed")) is Verdict.FAILURE
    assert policy.judge(error=ConnectionRefusedError()) is Verdict.FAILURE


def test_body_based_ban_detector() -> None:
    policy = HealthPolicy(ban_detector=lambda status, body: "captcha" in body if body is not None else None)
    assert policy.judge(200, response="<h1>captcha</h1>") is Verdict.BAN
    assert policy.judge(200, response="<h1>ok</h1>") is Verdict.OK
    assert policy.judge(403) is Verdict.BAN


def test_slow_proxies_are_benched_on_their_median() -> None:
    broker = make(URLS[:1], policy=HealthPolicy(slow_ms=100, slow_window=3))
    for latency in [20, 500, 30, 40]:
        with broker.lease() as lease:
            broker.report(lease, status_code=200, latency_ms=latency)
    assert broker.proxies()[0].status == ProxyStatus.ACTIVE  # one slow answer is not a verdict
    for latency in [300, 400]:
        with broker.lease() as lease:
            broker.report(lease, status_code=200, latency_ms=latency)
    assert broker.proxies()[0].status == ProxyStatus.SLOW


def test_latency_ring_keeps_the_last_window_in_order_and_is_not_walked_by_the_collector() -> None:
    """A broker keeps one latency ring per proxy for as long as it runs: it must stay
    bounded and ordered, and hold nothing the garbage collector's full passes walk."""
    import gc

    broker = make(URLS[:1])
    for ms in range(100):  # more than the 64 kept
        with broker.lease() as lease:
            broker.report(lease, status_code=200, latency_ms=float(ms))
    proxy_id = broker.proxies()[0].id
    state = broker._ledger.states[proxy_id]
    assert state.latencies() == [float(ms) for ms in range(36, 100)]
    assert state.latencies(3) == [97.0, 98.0, 99.0]
    assert broker.proxy_stats(proxy_id)["median_latency_ms"] == 67.5
    assert not gc.is_tracked(state._lat)
    state.clear_latencies()
    assert state.latencies() == [] and state.kept() == 0


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
    (fault injection: no real storage fails on demand): the picked lease goes back."""
    broker = make(selector="first_available")
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


def test_revival_works_across_brokers_sharing_a_storage() -> None:
    """Process B revives what process A benched: the return time comes from the storage."""
    storage = InMemoryStorage()
    policy = HealthPolicy(backoff_base=0.3, backoff_cap=1)
    a = LeaseBroker.from_proxies(URLS[:1], storage=storage, policy=policy, acquire_timeout=0)
    b = LeaseBroker(ProxyManager(storage), policy=policy, acquire_timeout=2, revive_scan_seconds=0.1)
    with a.lease() as lease:
        a.report(lease, status_code=403)
    with pytest.raises(NoProxyAvailable, match=r"all 1 proxies of pool 'default' benched: 1 banned; next back in"):
        b.acquire(timeout=0)
    with b.lease() as lease:  # waits for the cool-down, then B brings it back
        assert lease.proxy_id == a.proxies()[0].id
    assert b.counters["revived"] == 1 and a.counters["revived"] == 0


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


def test_routine_successes_do_not_grow_storage_or_memory() -> None:
    """Reports of routine successes stay in bounded per-proxy counters (the 1,000,000-call
    figure is measured by benchmarks/bench_core.py --reports)."""
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(100)]
    broker = LeaseBroker.from_proxies(urls, storage=InMemoryStorage())
    leases = [broker.acquire() for _ in range(100)]
    for lease in leases:
        broker.report(lease, status_code=200)  # warm-up: creates the per-proxy state
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(50_000):
        broker.report(leases[i % 100], status_code=200, latency_ms=i % 50)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 256 * 1024, f"memory grew by {grown} bytes over 50,000 reports"
    records = sum(len(broker.storage.list_health_records(p.id, limit=10_000)) for p in broker.proxies())
    assert records <= 100  # at most one routine record per proxy per flush interval
    for lease in leases:
        broker.release(lease)


def test_async_acquire_waits_without_blocking_the_loop() -> None:
    broker = make(URLS[:1], max_concurrency=1)

    async def scenario() -> tuple[int, str]:
        held = await broker.acquire_async()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.2, broker.release, held)
        async with broker.lease_async() as lease:
            url = lease.safe_url
        task.cancel()
        return ticks, url

    ticks, url = run_in_fresh_loop(scenario())
    assert ticks >= 10 and url == "http://127.0.0.1:8001"
    assert_nothing_held(broker)


def test_async_lease_is_released_on_cancellation() -> None:
    broker = make(URLS[:1])

    async def scenario() -> None:
        async def user() -> None:
            async with broker.lease_async():
                await asyncio.sleep(10)

        task = asyncio.create_task(user())
        await asyncio.sleep(0.05)
        assert broker.held == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_in_fresh_loop(scenario())
    assert_nothing_held(broker)


def test_logs_never_carry_credentials(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = make(URLS[:1], policy=HealthPolicy(backoff_base=0.05, backoff_cap=0.1))
    with broker.lease() as lease:
        broker.report(lease, status_code=403)
    time.sleep(0.1)
    with broker.lease():
        pass
    text = caplog.text
    assert "127.0.0.1:8001" in text and "banned" in text
    assert "s3cr" not in text and "alice" not in text
