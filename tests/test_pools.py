"""Pool administration (pharox_integrations/pools.py): what a pool holds, as users see it."""

from __future__ import annotations

import pytest
from brokerhelpers import URLS, make
from pharox import Proxy, ProxyStatus

from pharox_integrations import ProxyView


def test_proxies_are_read_only_views_that_never_print_credentials() -> None:
    broker = make()
    views = broker.proxies()
    assert all(isinstance(v, ProxyView) for v in views)
    shown = " ".join(repr(v) + str(v) + repr(views) for v in views)
    for secret in ("alice", "s3cr", "bob", "hunter2"):
        assert secret not in shown
    first = next(v for v in views if v.port == 8001)
    assert first.status is ProxyStatus.ACTIVE and first.current_leases == 0 and first.host == "127.0.0.1"
    assert (first.credentials.user, first.credentials.password) == ("alice", "s3cr et")  # readable, never printed
    assert isinstance(first.to_pharox(), Proxy)
    with pytest.raises(AttributeError, match="read-only"):
        first.status = ProxyStatus.BANNED  # type: ignore[misc]


def test_add_is_idempotent_and_remove_and_purge_take_views() -> None:
    broker = make()
    assert broker.add_proxies(URLS) == []  # a fleet may seed the same list from every process
    added = broker.add_proxies(["http://127.0.0.9:9009"])
    assert [v.port for v in added] == [9009]
    assert broker.remove_proxy(added[0]) is True
    assert broker.remove_proxy(added[0]) is False
    with broker.lease() as lease:
        broker.report(lease, status_code=403)
    health = broker.health()
    assert (health.total, health.banned, health.requests, health.success_rate) == (len(URLS), 1, 1, 0.0)
    assert broker.purge() == 1
    assert len(broker.proxies()) == len(URLS) - 1 and broker.health().banned == 0
