"""A kept-alive connection the proxy closes before answering is sent again, not counted.

`DroppingProxy` (tests/servers/dropping.py) relays each connection's first request
and silently closes the connection at its second: every reuse fails, every time.
With `max_failures=1` a single counted failure would bench the proxy, so these
tests prove the doors resend on a new connection instead of judging the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import urllib3
from servers.dropping import DroppingProxy

from pharox_integrations import HealthPolicy, LeaseBroker
from pharox_integrations.httpx import PharoxTransport
from pharox_integrations.requests import pharox_session
from pharox_integrations.urllib3 import PharoxProxyManager

REQUESTS = 6


@pytest.fixture
def dropping() -> Iterator[DroppingProxy]:
    with DroppingProxy() as proxy:
        yield proxy


def _get_requests(broker: LeaseBroker) -> Callable[[str], int]:
    session = pharox_session(broker)
    return lambda url: session.get(url, timeout=10).status_code


def _get_httpx(broker: LeaseBroker) -> Callable[[str], int]:
    client = httpx.Client(transport=PharoxTransport(broker), timeout=10)
    return lambda url: client.get(url).status_code


def _get_urllib3(broker: LeaseBroker) -> Callable[[str], int]:
    # urllib3's own default retries (Retry(3)) resend an idempotent request on a read error.
    manager = PharoxProxyManager(broker)
    return lambda url: manager.request("GET", url).status


@pytest.mark.parametrize("door", [_get_requests, _get_httpx, _get_urllib3], ids=["requests", "httpx", "urllib3"])
def test_dropped_keepalive_is_resent_not_counted(
    door: Callable[[LeaseBroker], Callable[[str], int]], dropping: DroppingProxy, target: Any
) -> None:
    broker = LeaseBroker.from_proxies([dropping.url], policy=HealthPolicy(max_failures=1), acquire_timeout=2)
    get = door(broker)
    assert [get(f"{target.url}/echo") for _ in range(REQUESTS)] == [200] * REQUESTS
    assert dropping.dropped >= REQUESTS - 1  # every reuse was dropped: the fault really happened
    assert dropping.relayed == REQUESTS
    (proxy,) = broker.proxies()
    assert proxy.status == "active" and proxy.current_leases == 0
    assert broker.proxy_stats(proxy.id)["failures"] == 0
    assert broker.held == 0


def test_a_proxy_that_drops_every_request_still_counts(target: Any) -> None:
    """The resend happens once: a proxy closing even fresh connections is judged."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)  # read the request, answer nothing
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        broker = LeaseBroker.from_proxies([f"http://127.0.0.1:{port}"], policy=HealthPolicy(max_failures=1))
        session = pharox_session(broker, max_moves=0)
        with pytest.raises(Exception) as caught:
            session.get(f"{target.url}/echo", timeout=10)
        assert "127.0.0.1" in str(caught.value)
        (proxy,) = broker.proxies()
        assert proxy.status == "inactive" and proxy.current_leases == 0
        assert broker.held == 0
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_urllib3_without_retries_resends_the_drop_once(dropping: DroppingProxy, target: Any) -> None:
    """With urllib3's own retries off, the core's rule still holds, as in every door: a
    kept-alive connection dropped before any answer is sent once more through the same
    proxy, on a new connection, and does not count against the proxy."""
    broker = LeaseBroker.from_proxies([dropping.url], policy=HealthPolicy(max_failures=5))
    manager = PharoxProxyManager(broker, retries=urllib3.Retry(0, read=False))
    assert manager.request("GET", f"{target.url}/echo").status == 200
    assert manager.request("GET", f"{target.url}/echo").status == 200
    assert dropping.dropped == 1
    (proxy,) = broker.proxies()
    assert broker.proxy_stats(proxy.id)["failures"] == 0 and broker.held == 0
    assert broker.proxy_stats(proxy.id)["requests"] == 2
