"""Shared by the tests: a memory broker over three proxies, the leak check, and a
bounded wait for what another thread does."""

from __future__ import annotations

import time
from collections.abc import Callable

from pharox_integrations import LeaseBroker

URLS = ["http://alice:s3cr%20et@127.0.0.1:8001", "http://127.0.0.2:8002", "socks5://bob:hunter2@127.0.0.3:1080"]


def make(urls: list[str] = URLS, **kw: object) -> LeaseBroker:
    kw.setdefault("acquire_timeout", 0.3)
    return LeaseBroker.from_proxies(urls, **kw)  # type: ignore[arg-type]


def statuses(broker: LeaseBroker) -> dict[str, str]:
    return {f"{p.host}:{p.port}": p.status.value for p in broker.proxies()}


def assert_nothing_held(broker: LeaseBroker) -> None:
    assert broker.held == 0
    give_back_kept_slots(broker)
    assert [p.current_leases for p in broker.proxies()] == [0] * len(broker.proxies())


def banned_there(broker: LeaseBroker, site: str) -> set[int]:
    """Ports of the proxies `site` (a URL, host or domain) bans now: its own verdict,
    not the proxy's status."""
    held = broker.sites.holds(broker.sites.site_of_name(site))
    return {p.port for p in broker.proxies() if p.id in held and held[p.id].kind == "ban"}


def give_back_kept_slots(broker: LeaseBroker) -> None:
    """Give back the slots a lease block keeps for the next request (on a shared
    storage), so the storage's counts show only leases still in use or lost."""
    for block in broker._selection.blocks():
        block.close()


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether `check()` became true within `timeout` s (a release done by a closer or
    reaper thread after GC or `close()`)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
