"""urllib3 door against the contract every door meets (`pharox_integrations.exchange`):
every proxy banning returns the last ban answer, a 407 is the proxy's failure, a body is
sent again only when it can be (a seekable one rewound), one move budget (`max_moves`,
`proxy_retries` its deprecated name).  Real proxies and targets throughout.
"""

from __future__ import annotations

import io
import pickle
import ssl
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from pharox import ProxyStatus
from servers import KitProxy, TargetServer
from test_urllib3_manager import MakeBroker, make_broker
from urllib3.exceptions import HTTPError, MaxRetryError, ProxyError
from urllib3.util.timeout import Timeout

from pharox_integrations import AllProxiesFailed, LeaseBroker, ProxyAuthenticationFailed
from pharox_integrations.urllib3 import (
    AllProxiesFailedError,
    NoProxyAvailableError,
    PharoxProxyManager,
    ProxyAuthenticationFailedError,
)

TIMEOUT = 10.0

__all__ = ["make_broker"]  # the fixture, shared with the door's other tests


def statuses(broker: LeaseBroker) -> set[ProxyStatus]:
    return {ProxyStatus(p.status) for p in broker.proxies()}


@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "streamed"])
def test_every_proxy_banning_returns_the_last_ban_answer(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer, preload: bool
) -> None:
    pair = proxy_trio[:2]  # fewer proxies than the default move budget (3)
    for proxy in pair:
        target.ban(proxy.outbound_ip)
    broker = make_broker(pair)
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        r = pm.request("GET", f"{target.url}/echo", preload_content=preload)
        assert r.status == 403  # an answer, not an exception
        assert target.hits == Counter({p.outbound_ip: 1 for p in pair})  # each tried once
        assert broker.held == (0 if preload else 1)  # a streamed answer keeps its proxy until read
        assert r.data == b"banned\n"
        assert broker.held == 0
    assert statuses(broker) == {ProxyStatus.ACTIVE}  # the site's verdict, not the world's
    assert broker.health(site=target.url).site_banned == 2


@pytest.mark.parametrize("scheme", ["http", "https"], ids=["forwarded-407", "connect-407"])
def test_a_proxy_refusing_credentials_moves_then_raises(
    make_broker: MakeBroker, auth_http_proxy: KitProxy, target: TargetServer, tls_target: TargetServer, scheme: str
) -> None:
    """Forwarded HTTP: proxy.py answers 407 itself; HTTPS: it refuses the CONNECT with 407.
    Either way the proxy failed, not the site: the request moves, and with nothing left
    the caller gets ProxyAuthenticationFailedError (a urllib3 ProxyError and HTTPError)."""
    wrong = [f"http://wrong{i}:pw@127.0.0.1:{auth_http_proxy.port}" for i in (1, 2)]
    broker = make_broker(wrong)
    site = target if scheme == "http" else tls_target
    with PharoxProxyManager(broker, ca_certs=tls_target.ca_bundle, timeout=TIMEOUT, retries=False) as pm:
        with pytest.raises(ProxyAuthenticationFailedError) as raised:
            pm.request("GET", f"{site.url}/echo")
        assert broker.held == 0 and pm.held == 0
    error = raised.value
    assert isinstance(error, HTTPError) and isinstance(error, ProxyError) and isinstance(error, MaxRetryError)
    assert isinstance(error, ProxyAuthenticationFailed) and isinstance(error, AllProxiesFailed)
    assert [a.outcome for a in error.attempts] == ["failure", "failure"]  # moved once, then none left
    assert "407" in str(error) and "\n" not in str(error) and "wrong" not in str(error)
    assert error.url == f"{site.url}/echo"
    assert site.hits.total() == 0 and broker.counters["failures"] == 2
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is ProxyAuthenticationFailedError and str(back) == str(error) and back.url == error.url


def test_a_407_moves_the_request_to_a_proxy_that_works(
    make_broker: MakeBroker, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    wrong = f"http://wrong:pw@127.0.0.1:{auth_http_proxy.port}"
    broker = make_broker([wrong, auth_http_proxy])
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        for _ in range(4):  # round robin: some request starts on the refusing entry and moves
            assert pm.request("GET", f"{target.url}/echo").status == 200
            assert broker.held == 0
    assert target.hits == Counter({auth_http_proxy.outbound_ip: 4})  # the 407s never reached the site
    failures = sorted(broker.proxy_stats(p.id)["failures"] for p in broker.proxies())
    assert failures[0] == 0 and failures[1] >= 1  # the refusing entry, each time it was tried


def test_a_seekable_body_is_rewound_and_moved(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    banned = proxy_trio[0]
    target.ban(banned.outbound_ip)
    payload = b"0123456789" * 20_000 + b"end"
    broker = make_broker(proxy_trio)
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        for _ in range(3):  # round robin: one of the three starts on the banned proxy
            body = io.BytesIO(b"prefix" + payload)
            body.read(6)  # the body starts mid-stream: rewound to here, not to 0
            r = pm.request("POST", f"{target.url}/echo", body=body)
            assert r.status == 200 and broker.held == 0
    assert target.hits[banned.outbound_ip] == 1 and len(target.requests) == 4  # one move
    assert [len(seen.body) for seen in target.requests] == [len(payload)] * 4
    assert all(seen.body == payload for seen in target.requests)


def test_a_generator_body_is_never_sent_twice(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = make_broker(proxy_trio)
    produced: list[bytes] = []

    def body() -> Iterator[bytes]:
        for part in (b"one,", b"two"):
            produced.append(part)
            yield part

    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        r = pm.request("POST", f"{target.url}/echo", body=body())
        assert r.status == 403  # the ban answer: the body is gone, so no move
        assert broker.held == 0
    assert target.hits.total() == 1 and target.requests[0].body == b"one,two"
    assert produced == [b"one,", b"two"]


def test_a_generator_body_through_a_dead_proxy_says_why_it_did_not_move(
    make_broker: MakeBroker, proxy_kit: Any, target: TargetServer
) -> None:
    dead = proxy_kit.dead()
    broker = make_broker([dead])
    with PharoxProxyManager(broker, retries=False) as pm, pytest.raises(AllProxiesFailedError) as raised:
        pm.request("POST", f"{target.url}/echo", body=iter([b"x"]))
    assert "could not be replayed" in str(raised.value)
    assert str(raised.value).count(f"127.0.0.1:{dead.port}") == 1
    assert broker.held == 0 and target.hits.total() == 0


def test_proxy_retries_is_the_old_name_of_max_moves(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = make_broker(proxy_trio)
    with pytest.warns(DeprecationWarning, match="proxy_retries= is deprecated: use max_moves="):
        pm = PharoxProxyManager(broker, proxy_retries=1, timeout=TIMEOUT)
    with pm:
        assert pm.max_moves == 1
        assert pm.request("GET", f"{target.url}/echo").status == 403
        assert target.hits.total() == 2 and broker.held == 0  # one move, as max_moves=1
    with pytest.raises(ValueError, match="max_moves"):
        PharoxProxyManager(broker, proxy_retries=1, max_moves=1)
    with pytest.raises(ValueError, match="max_moves"):
        PharoxProxyManager(broker, max_moves=-1)


def test_ssl_context_with_forwarding_warns_at_construction_as_urllib3_does(
    make_broker: MakeBroker, http_proxy: KitProxy
) -> None:
    context = ssl.create_default_context()
    with pytest.warns(FutureWarning) as ours:
        pm = PharoxProxyManager(make_broker([http_proxy]), use_forwarding_for_https=True, ssl_context=context)
    with pytest.warns(FutureWarning) as theirs:
        plain = urllib3.ProxyManager("https://127.0.0.1:9", use_forwarding_for_https=True, ssl_context=context)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert ours[0].filename == __file__  # points at the caller, as urllib3's does
    assert pm.proxy_ssl_context is plain.proxy_ssl_context is context
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PharoxProxyManager(make_broker([http_proxy]), ssl_context=context)  # no forwarding: nothing to say


def test_the_callers_connect_timeout_caps_the_wait_for_a_proxy(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer
) -> None:
    broker = make_broker([http_proxy], max_concurrency=1, acquire_timeout=5.0)
    with PharoxProxyManager(broker) as pm:
        held = pm.request("GET", f"{target.url}/bytes?n=50000", preload_content=False)  # the only proxy, held
        started = time.monotonic()
        with pytest.raises(NoProxyAvailableError):
            pm.request("GET", f"{target.url}/echo", timeout=Timeout(connect=0.3, read=TIMEOUT))
        assert time.monotonic() - started < 2.5  # not the broker's 5 s
        assert len(held.read()) == 50000 and broker.held == 0
