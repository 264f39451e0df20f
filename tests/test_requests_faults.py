"""requests door under faults: bans, dead and crashing proxies, many threads, one Session."""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import urllib3
from brokerhelpers import banned_there, give_back_kept_slots

from pharox_integrations import HealthPolicy, LeaseBroker, ReportFailed
from pharox_integrations.requests import PharoxAdapter

if __package__:
    from .servers import expected_bytes
    from .test_requests_adapter import Door, assert_no_secret, door
else:
    from servers import expected_bytes
    from test_requests_adapter import Door, assert_no_secret, door

__all__ = ["door"]  # the fixture, imported for pytest


def test_banned_proxy_is_left_and_requests_move(door: Door, target: Any, proxy_trio: Any) -> None:
    banned = proxy_trio[0]
    target.ban(banned.outbound_ip)
    broker = door.broker(proxy_trio)
    session = door.session(broker)
    for _ in range(12):
        r = session.get(f"{target.url}/echo")
        assert r.status_code == 200 and r.json()["peer_ip"] != banned.outbound_ip
    assert target.hits[banned.outbound_ip] == 1  # banned at the first 403, never sent there again
    status = {p.port: p.status for p in broker.proxies()}
    assert status[banned.port] == "active"  # the site's verdict, not the world's
    assert banned_there(broker, target.url) == {banned.port}


def test_all_banned_gives_the_last_response(door: Door, target: Any, proxy_trio: Any) -> None:
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip, status=429)
    broker = door.broker(proxy_trio, acquire_timeout=0.2)
    session = door.session(broker, max_moves=5)
    r = session.get(f"{target.url}/echo")
    assert r.status_code == 429
    assert r.text == "banned\n"  # the body of the last answer, still readable
    assert sum(target.hits.values()) == 3  # each proxy once, then none left to try


def test_stream_moves_off_a_banned_proxy(door: Door, target: Any, proxy_trio: Any) -> None:
    target.ban(proxy_trio[0].outbound_ip)
    target.ban(proxy_trio[1].outbound_ip)
    broker = door.broker(proxy_trio)
    session = door.session(broker)
    with session.get(f"{target.url}/bytes?n=20000", stream=True) as r:
        assert r.status_code == 200
        assert broker.held == 1  # the banned tries were released on the way
        assert r.raw.read() == expected_bytes(20000)
    assert broker.held == 0


def test_crashed_proxy_is_benched(door: Door, target: Any, proxy_trio: Any) -> None:
    crashed = proxy_trio[2]
    broker = door.broker(proxy_trio, policy=HealthPolicy(max_failures=2, backoff_base=600, backoff_cap=600))
    session = door.session(broker)
    assert session.get(f"{target.url}/echo").status_code == 200  # warm keep-alive pools
    crashed.kill()
    for _ in range(10):
        assert session.get(f"{target.url}/echo").status_code == 200
    status = {p.port: p.status for p in broker.proxies()}
    assert status[crashed.port] == "inactive"


def test_threads_share_one_session_through_faults(
    door: Door,
    caplog: pytest.LogCaptureFixture,
    target: Any,
    tls_target: Any,
    proxy_trio: Any,
    socks5_proxy: Any,
    proxy_kit: Any,
) -> None:
    """8 threads x 200 requests; one proxy banned, one dead, one killed mid-run."""
    caplog.set_level(logging.INFO)
    banned, healthy, doomed = proxy_trio
    dead = proxy_kit.dead()
    target.ban(banned.outbound_ip)
    tls_target.ban(banned.outbound_ip)
    broker = door.broker([*proxy_trio, socks5_proxy, dead], acquire_timeout=5.0)
    session = door.session(broker, max_moves=6)
    counter = itertools.count()
    kill_at = 400
    outcomes: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def one(i: int) -> tuple[str, Any]:
        n = next(counter)
        if n == kill_at:
            doomed.kill()
        kind = ("echo", "tls", "stream_partial", "stream_full", "status")[i % 5]
        try:
            if kind == "echo":
                r = session.get(f"{target.url}/echo")
                return kind, (r.status_code, r.json()["peer_ip"])
            if kind == "tls":
                r = session.get(f"{tls_target.url}/echo", verify=tls_target.ca_bundle)
                return kind, (r.status_code, r.json()["peer_ip"])
            if kind == "status":
                return kind, (session.get(f"{target.url}/status/404").status_code, None)
            with session.get(f"{target.url}/bytes?n=30000&chunk=3000", stream=True) as r:
                if kind == "stream_partial":
                    chunks = r.iter_content(1000)
                    ok = next(chunks) == expected_bytes(1000)
                else:
                    ok = r.raw.read() == expected_bytes(30000)
                return kind, (r.status_code if ok else "bad body", None)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            # Only a body cut by the crash may fail: requests cannot be moved mid-body.
            # `r.raw.read()` is urllib3's API, so a cut body read that way raises urllib3's error.
            # urllib3's errors carry no `.response` (a cut `r.raw.read()` raises one).
            return "error", (type(exc).__name__, getattr(getattr(exc, "response", None), "pharox_proxy", None))

    def worker(w: int) -> None:
        results = [one(w * 200 + i) for i in range(200)]
        with lock:
            outcomes.extend(results)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))

    assert len(outcomes) == 1600
    errors = [o for o in outcomes if o[0] == "error"]
    assert len(errors) <= 8, errors  # at most the streams in flight on the killed proxy
    good = [o for o in outcomes if o[0] != "error"]
    expected = {"echo": 200, "tls": 200, "stream_partial": 200, "stream_full": 200, "status": 404}
    assert all(status == expected[kind] for kind, (status, _) in good), [o for o in good if o[1][0] != 200]
    assert not any(ip == banned.outbound_ip for _, (_, ip) in good)
    status = {(p.protocol, p.port): p.status for p in broker.proxies()}
    # What a failure here needs to be understood (this test has failed once in a loaded
    # full run, not reproduced since): every proxy's status and the broker's counters.
    seen = f"statuses {status}, counters {broker.counters}, peak {broker.peak_held}, errors {errors}"
    assert status[("http", banned.port)] == "active", seen  # banned by the site only
    assert banned_there(broker, target.url) == {banned.port}, seen
    assert status[("http", dead.port)] == "inactive", seen
    assert status[("http", doomed.port)] == "inactive", seen
    assert status[("http", healthy.port)] == "active" and status[("socks5", socks5_proxy.port)] == "active", seen
    assert broker.peak_held <= 8, seen
    assert not target.saw_header("Proxy-Authorization") and not tls_target.saw_header("Proxy-Authorization")
    assert_no_secret(caplog.text)
    # The door fixture then proves no lease is held and every proxy's count is 0.


# ---------------------------------------------------------------------- a failing judge


def checked_out(adapter: PharoxAdapter) -> int:
    """Connections taken out of the adapter's per-proxy pools and never given back."""
    total = 0
    for manager in list(adapter.proxy_manager.values()):
        pools = [manager.pools[key] for key in manager.pools.keys()]  # noqa: SIM118  # the LRU refuses iteration
        total += sum(p.pool.maxsize - p.pool.qsize() for p in pools if p.pool is not None)
    return total


def assert_all_back(door: Door, broker: LeaseBroker, session: requests.Session) -> None:
    adapter = door.adapter(session)
    assert broker.held == 0 and adapter.held == 0, broker.held_leases()
    give_back_kept_slots(broker)  # a lease block's free slots (shared storage) are not in use
    assert [p.current_leases for p in broker.proxies()] == [0] * len(broker.proxies())
    assert broker.counters["released"] == broker.counters["acquired"]
    assert checked_out(adapter) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["read", "streamed"])
def test_a_ban_detector_that_raises_gives_everything_back(
    door: Door, target: Any, proxy_trio: Any, stream: bool
) -> None:
    """A bug in the user's ban detector reaches the caller as `ReportFailed` (the same type
    in every door; here also a `requests.RequestException`) with the bug chained; the
    lease, the proxy's count and the connection all go back, the proxy is not judged,
    and the next request works."""
    broken = [True]

    def detector(status_code: int | None, response: Any) -> bool | None:
        if broken[0]:
            raise RuntimeError("detector bug")
        return None

    broker = door.broker(proxy_trio, policy=HealthPolicy(ban_detector=detector, backoff_base=600, backoff_cap=600))
    session = door.session(broker)
    for _ in range(2):
        with pytest.raises(ReportFailed, match="detector bug") as caught:
            session.get(f"{target.url}/echo", stream=stream)
        assert isinstance(caught.value, requests.RequestException)
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert_all_back(door, broker, session)
    assert broker.counters["acquired"] == 2
    assert {p.status for p in broker.proxies()} == {"active"}  # a detector bug is not the proxy's fault
    broken[0] = False
    with session.get(f"{target.url}/echo", stream=stream) as r:
        assert r.status_code == 200 and r.json()["peer_ip"] in {p.outbound_ip for p in proxy_trio}
    assert_all_back(door, broker, session)


@pytest.mark.parametrize("stream", [False, True], ids=["read", "streamed"])
def test_a_ban_the_storage_cannot_record_gives_everything_back(
    door: Door, target: Any, proxy_trio: Any, stream: bool
) -> None:
    """The target bans every proxy and recording the bench fails in the storage (fault
    injection: no real storage fails on demand, so the write of the site's ban,
    `sites.store.put`, is replaced for the test).  The caller gets `ReportFailed` with the storage's error
    chained; the lease, the proxy's count and the connection all go back, and once the
    storage works again so do requests."""
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = door.broker(proxy_trio)
    session = door.session(broker)

    def broken(*args: object) -> None:
        raise RuntimeError("storage unavailable")

    broker.sites.store.put = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(ReportFailed, match="storage unavailable") as caught:
            session.get(f"{target.url}/echo", stream=stream)
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert sum(target.hits.values()) == 1  # not moved on: the outcome could not be recorded
        assert_all_back(door, broker, session)
    finally:
        del broker.sites.store.put
    for proxy in proxy_trio:
        target.unban(proxy.outbound_ip)
    with session.get(f"{target.url}/echo", stream=stream) as r:
        assert r.status_code == 200 and r.json()["peer_ip"] in {p.outbound_ip for p in proxy_trio}
    assert_all_back(door, broker, session)
