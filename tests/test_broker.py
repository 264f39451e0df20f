"""The broker facade on a real storage, without a network: leases, release, async forms, logs."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from brokerhelpers import URLS, assert_nothing_held, make, statuses
from loophelpers import run_in_fresh_loop

from pharox_integrations import HealthPolicy, Verdict


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

