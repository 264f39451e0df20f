"""The leases a broker hands out (`leases.py`): counted, reported, released exactly once."""

from __future__ import annotations

import logging

import pytest
from brokerhelpers import URLS, assert_nothing_held, make

from pharox_integrations import HealthPolicy, ProxyLease, Verdict


def test_held_leases_are_counted_per_pool_with_their_peak() -> None:
    broker = make(URLS[:2], max_concurrency=2)
    broker.add_proxies(["http://127.0.0.9:8009"], pool="other")
    a, b = broker.acquire(), broker.acquire()
    c = broker.acquire(pool="other")
    leases = broker._leases
    assert (leases.count(), leases.count(broker.pool), leases.count("other")) == (3, 2, 1)
    assert set(broker.held_leases()) == {a, b, c}
    for lease in (a, b, c):
        broker.release(lease)
    assert broker.acquire() is not None
    assert broker.peak_held == 3 and broker.held == 1
    assert broker.close() == 1
    assert_nothing_held(broker)


def test_a_lease_is_released_once_whichever_path_gets_there_first() -> None:
    broker = make(URLS[:1])
    lease = broker.acquire()
    assert broker.finish(lease, 200, latency_ms=5.0) is Verdict.OK
    assert broker.release(lease) is False
    assert broker._leases.release_all() == 0
    assert broker.counters["released"] == broker.counters["acquired"] == 1
    assert_nothing_held(broker)


def test_a_failing_ban_detector_still_releases_on_finish_but_not_on_report() -> None:
    def detector(status_code: int | None, response: object) -> bool:
        raise ValueError("detector broke")

    broker = make(URLS[:1], policy=HealthPolicy(ban_detector=detector))
    lease = broker.acquire()
    with pytest.raises(ValueError, match="detector broke"):
        broker.report(lease, 200, response=object())
    assert not lease.released and not lease.reported and broker.held == 1
    with pytest.raises(ValueError, match="detector broke"):
        broker.finish(lease, 200, response=object())
    assert lease.released
    assert_nothing_held(broker)


def test_release_all_keeps_going_past_a_lease_the_storage_cannot_release(caplog: pytest.LogCaptureFixture) -> None:
    broker = make(URLS[:2])
    first, second = broker.acquire(), broker.acquire()
    storage = broker.storage
    real = storage.release_lease
    calls: list[object] = []

    def flaky(handle: object) -> None:
        calls.append(handle)
        if len(calls) == 1:
            raise RuntimeError("storage unavailable")
        real(handle)  # type: ignore[arg-type]

    storage.release_lease = flaky  # type: ignore[method-assign,assignment]
    try:
        with caplog.at_level(logging.INFO, logger="pharox_integrations"):
            released = broker._leases.release_all()
    finally:
        del storage.release_lease
    # The first is marked released (never handed out twice) though its storage half
    # failed; the second goes back regardless.
    assert released == 1 and first.released and second.released and broker.held == 0
    assert "could not release a lease" in caplog.text
    assert all("s3cr" not in r.getMessage() for r in caplog.records)
    assert sum(p.current_leases for p in broker.proxies()) == 1
    broker._leases.release_in_storage(calls[0])  # type: ignore[arg-type]  # the storage is back
    assert_nothing_held(broker)


def test_a_sticky_lease_is_remembered_for_its_session() -> None:
    broker = make(URLS[:2], max_concurrency=1)
    lease = broker.acquire(session="account-42")
    assert isinstance(lease, ProxyLease) and lease.session == "account-42"
    broker.finish(lease, 200, latency_ms=5.0)
    assert broker.acquire(session="account-42").proxy_id == lease.proxy_id
    broker.close()
    assert_nothing_held(broker)
