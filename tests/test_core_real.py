"""The core through real proxies (proxy.py, a closed port) to a real target: health and no lost lease.

The requests are sent with plain urllib3 here: this checks the core's judgement and
bookkeeping, not a door.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import urllib3
from pharox import ProxyStatus

from pharox_integrations import HealthPolicy, LeaseBroker, ProxyLease


def fetch(broker: LeaseBroker, lease: ProxyLease, url: str) -> int | None:
    """Send one GET through the leased proxy, report the outcome, return the status."""
    headers = {"Proxy-Authorization": lease.proxy_authorization} if lease.proxy_authorization else None
    manager = urllib3.ProxyManager(lease.safe_url, proxy_headers=headers, retries=False, timeout=5)
    try:
        response = manager.request("GET", url)
    except urllib3.exceptions.HTTPError as exc:
        broker.report(lease, error=exc)
        return None
    finally:
        manager.clear()
    broker.report(lease, status_code=response.status)
    return response.status


def by_host(broker: LeaseBroker) -> dict[tuple[str, int], Any]:
    return {(str(p.host), p.port): p for p in broker.proxies()}


def test_banned_proxy_is_benched_then_returns_and_dead_proxy_goes_inactive(proxy_trio, proxy_kit, target) -> None:
    good, banned, other = proxy_trio
    dead = proxy_kit.dead()
    target.ban(banned.outbound_ip)
    broker = LeaseBroker.from_proxies(
        [p.url for p in (good, banned, other, dead)],
        policy=HealthPolicy(backoff_base=1.5, backoff_cap=3, max_failures=2),
        acquire_timeout=5,
    )
    for _ in range(12):
        with broker.lease() as lease:
            fetch(broker, lease, f"{target.url}/status/200")
    proxies = by_host(broker)
    assert proxies[("127.0.0.1", banned.port)].status == ProxyStatus.BANNED
    assert proxies[("127.0.0.1", dead.port)].status == ProxyStatus.INACTIVE
    assert proxies[("127.0.0.1", good.port)].status == ProxyStatus.ACTIVE
    assert proxies[("127.0.0.1", other.port)].status == ProxyStatus.ACTIVE
    assert target.hits[banned.outbound_ip] == 1  # banned at its first answer, then never leased
    # While it cools down it is not leased.
    for _ in range(6):
        with broker.lease() as lease:
            assert lease.port not in (banned.port, dead.port)
    target.unban(banned.outbound_ip)
    time.sleep(3.2)
    served = Counter()
    for _ in range(12):
        with broker.lease() as lease:
            served[lease.port] += 1
            fetch(broker, lease, f"{target.url}/status/200")
    assert served[banned.port] >= 1 and target.hits[banned.outbound_ip] >= 2
    assert by_host(broker)[("127.0.0.1", banned.port)].status == ProxyStatus.ACTIVE
    assert broker.held == 0 and all(p.current_leases == 0 for p in broker.proxies())


def test_target_errors_are_not_the_proxys_fault(proxy_trio, target) -> None:
    broker = LeaseBroker.from_proxies([proxy_trio[0].url], policy=HealthPolicy(max_failures=1))
    for code in (404, 500, 503, 200):
        with broker.lease() as lease:
            assert fetch(broker, lease, f"{target.url}/status/{code}") == code
    assert broker.proxies()[0].status == ProxyStatus.ACTIVE


def test_thousand_requests_from_eight_threads_with_faults_lose_nothing(proxy_trio, proxy_kit, target) -> None:
    good, banned, other = proxy_trio
    dead = proxy_kit.dead()
    target.ban(banned.outbound_ip, status=429)
    broker = LeaseBroker.from_proxies(
        [p.url for p in (good, banned, other, dead)],
        policy=HealthPolicy(backoff_base=0.3, backoff_cap=0.6, max_failures=2),
        acquire_timeout=20,
        max_concurrency=4,
    )
    released: Counter[str] = Counter()
    lock = threading.Lock()

    def on_release(payload: Any) -> None:
        with lock:
            released[str(payload.lease.id)] += 1

    broker.lease_manager.register_release_callback(on_release)
    acquired: list[str] = []
    errors: list[BaseException] = []
    paths = ["/status/200"] * 6 + ["/drop", "/slow?ms=20", "/status/500", "/bytes?n=20000&chunk=4096"]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(125):
                with broker.lease() as lease:
                    with lock:
                        acquired.append(str(lease.lease.id))
                    fetch(broker, lease, target.url + rng.choice(paths))
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert errors == []
    assert len(acquired) == 1000 and len(set(acquired)) == 1000
    assert set(released) == set(acquired) and set(released.values()) == {1}  # each exactly once
    assert broker.held == 0
    assert [p.current_leases for p in broker.proxies()] == [0, 0, 0, 0]
    assert broker.counters["cooldowns"] >= 1 and broker.counters["failures"] >= 1  # 429: a cool-down
