"""How long a caller waits when no proxy can be had, per door: bounded by its own timeout.

    python benchmarks/bench_waits.py

One pproxy and one local target (benchmarks/loopback.py), a broker with
`acquire_timeout=30`, and three situations: the only proxy benched for 120 s (nothing can
come back within the caller's 5 s: answered at once), an unknown pool (at once), and the
only proxy busy with another request (`max_concurrency=1`: the caller's 1.5 s, not 30 s).
Every lease is checked released after each.  Scrapy is covered by tests/test_contract.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
from loopback import entries, start_pproxy, start_target

from pharox_integrations import HealthPolicy, LeaseBroker
from pharox_integrations.httpx import PharoxTransport
from pharox_integrations.requests import pharox_session
from pharox_integrations.urllib3 import PharoxProxyManager

Fetch = Callable[[LeaseBroker, str, float], object]


def via_requests(broker: LeaseBroker, url: str, timeout: float) -> object:
    with pharox_session(broker) as session:
        return session.get(url, timeout=timeout).status_code


def via_urllib3(broker: LeaseBroker, url: str, timeout: float) -> object:
    manager = PharoxProxyManager(broker)
    try:
        return manager.request("GET", url, timeout=timeout, retries=False).status
    finally:
        manager.clear()


def via_httpx(broker: LeaseBroker, url: str, timeout: float) -> object:
    with httpx.Client(transport=PharoxTransport(broker), timeout=timeout) as client:
        return client.get(url).status_code


def timed(fetch: Fetch, broker: LeaseBroker, url: str, timeout: float) -> str:
    held_before = broker.held
    started = time.monotonic()
    try:
        outcome = str(fetch(broker, url, timeout))
    except Exception as exc:  # the outcome to print: which error, and when
        outcome = type(exc).__name__
    elapsed = time.monotonic() - started
    assert broker.held == held_before, "a lease was left held"
    return f"{outcome} in {elapsed * 1000:.1f} ms" if elapsed < 1 else f"{outcome} in {elapsed:.2f} s"


def main() -> None:
    logging.disable(logging.CRITICAL)
    target, base = start_target()
    proxy, port = start_pproxy()
    url = f"{base}/status/200"
    try:
        print(
            "| door | only proxy benched 120 s (timeout 5 s) | unknown pool (timeout 5 s) "
            "| only proxy busy (timeout 1.5 s) |"
        )
        print("|---|---|---|---|")
        for name, fetch in (("requests", via_requests), ("urllib3", via_urllib3), ("httpx", via_httpx)):
            cool_down = HealthPolicy(backoff_base=120)
            benched = LeaseBroker.from_proxies(entries(port, 1), acquire_timeout=30, policy=cool_down)
            with benched.lease() as lease:
                benched.report(lease, status_code=403)
            unknown = LeaseBroker.from_proxies(entries(port, 1), acquire_timeout=30, pool="shop")
            unknown.pool = "nope"
            busy = LeaseBroker.from_proxies(entries(port, 1), acquire_timeout=30, max_concurrency=1)
            elsewhere = busy.acquire()
            cells = [timed(fetch, benched, url, 5), timed(fetch, unknown, url, 5)]
            try:
                cells.append(timed(fetch, busy, url, 1.5))
            finally:
                busy.release(elsewhere)
            assert busy.held == 0
            print(f"| {name} | " + " | ".join(cells) + " |")
    finally:
        target.kill()
        proxy.kill()


if __name__ == "__main__":
    main()
