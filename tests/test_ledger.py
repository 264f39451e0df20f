"""The health ledger (pharox_integrations/ledger.py): verdicts counted, benches written, cool-downs ended."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from brokerhelpers import URLS, make
from pharox import InMemoryStorage, ProxyManager, ProxyStatus

from pharox_integrations import HealthPolicy, LeaseBroker, NoProxyAvailable, Verdict
from pharox_integrations.health import strikes_from_records


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


def test_a_due_revival_scan_is_left_to_the_first_inline_request() -> None:
    """An event loop leases inline unless a revival or scan is due; then the first
    request goes off the loop (where `revive_due` does the work) and the requests after
    it stay inline; a claim never followed by the work lapses after a tenth of a second."""
    broker = LeaseBroker.from_proxies(URLS, revive_scan_seconds=0.2)
    ledger, pool = broker._ledger, broker.pool
    ledger.revive_due(pool, scan=True)  # scanned just now
    assert not ledger.due(pool) and not ledger.due_inline(pool)
    time.sleep(0.25)
    assert ledger.due(pool)
    assert ledger.due_inline(pool)  # the first request goes off the loop...
    claimed = time.monotonic()
    later = [ledger.due_inline(pool) for _ in range(20)]  # ...the next ones stay on it
    if time.monotonic() - claimed < 0.09:  # (unless this process stalled past the claim)
        assert not any(later)
    ledger.revive_due(pool)  # the first request's attempt off the loop scans
    assert not ledger.due(pool) and not ledger.due_inline(pool)
    time.sleep(0.25)
    assert ledger.due_inline(pool)  # due again; this claim is never followed by a scan...
    time.sleep(0.15)
    assert ledger.due_inline(pool)  # ...so it lapses and the next request takes it
    broker.close()
