"""urllib3 door: `PharoxProxyManager` through real proxies (proxy.py, pproxy, a closed port)
to real HTTP and HTTPS targets.

Every broker a test builds is checked at teardown: no lease held, no proxy with a
current lease.

proxy.py 2.4 quirk: after the first request on a keep-alive client connection it pipes
the connection raw to the first upstream, so later requests on that connection reach the
target unparsed, Proxy-Authorization included (plain `urllib3.ProxyManager` shows the
same).  Tests that check the header never reaches a target over *forwarded* HTTP send
``Connection: close``; CONNECT tunnels and SOCKS are checked with keep-alive.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import urllib3
from brokerhelpers import give_back_kept_slots
from pharox import ProxyStatus
from servers import SPECIAL_AUTH, KitProxy, TargetServer, expected_bytes
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util.retry import Retry

from pharox_integrations import (
    AllProxiesFailed,
    HealthPolicy,
    LeaseBroker,
    NoProxyAvailable,
    ProxyAuthenticationFailed,
    ReportFailed,
)
from pharox_integrations.urllib3 import (
    AllProxiesFailedError,
    NoProxyAvailableError,
    PharoxProxyManager,
    ProxyAuthenticationFailedError,
    ProxyNotLeasedError,
    ReportFailedError,
)

CLOSE = {"Connection": "close"}
TIMEOUT = 10.0
SECRETS = (
    SPECIAL_AUTH[1],
    quote(SPECIAL_AUTH[1], safe=""),
    base64.b64encode(":".join(SPECIAL_AUTH).encode()).decode(),
)

MakeBroker = Callable[..., LeaseBroker]


@pytest.fixture
def make_broker() -> Iterator[MakeBroker]:
    """Build brokers from kit proxies; at teardown none may hold a lease."""
    made: list[LeaseBroker] = []

    def make(proxies: list[Any], **kw: Any) -> LeaseBroker:
        kw.setdefault("acquire_timeout", 3.0)
        broker = LeaseBroker.from_proxies([getattr(p, "url", p) for p in proxies], **kw)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        assert broker.held == 0, broker.held_leases()
        give_back_kept_slots(broker)  # a lease block's free slots (shared storage) are not in use
        assert [p.current_leases for p in broker.proxies()] == [0] * len(broker.proxies())
        assert broker.counters["acquired"] == broker.counters["released"]
        broker.close()


def echo(response: Any) -> dict[str, Any]:
    assert response.status == 200, response.status
    data: dict[str, Any] = json.loads(response.data)
    return data


def statuses(broker: LeaseBroker) -> dict[int, ProxyStatus]:
    return {p.port: ProxyStatus(p.status) for p in broker.proxies()}


def echo_ip(target: TargetServer, response: Any) -> str:
    """The peer IP of the request that produced a (streamed) response: the target's last one."""
    assert response.status == 200
    return target.requests[-1].peer_ip


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret leaked in: {text[:200]}"


# -- drop-in ------------------------------------------------------------------------


def test_is_a_urllib3_proxy_manager(make_broker: MakeBroker, http_proxy: KitProxy) -> None:
    with PharoxProxyManager(make_broker([http_proxy])) as pm:
        assert isinstance(pm, urllib3.ProxyManager)
        assert isinstance(pm, urllib3.PoolManager)
        assert pm.proxy is None and pm.current_lease is None
    assert issubclass(NoProxyAvailableError, HTTPError) and issubclass(NoProxyAvailableError, NoProxyAvailable)
    assert issubclass(AllProxiesFailedError, MaxRetryError) and issubclass(AllProxiesFailedError, AllProxiesFailed)
    assert issubclass(ProxyNotLeasedError, HTTPError)
    auth = ProxyAuthenticationFailedError
    assert issubclass(auth, AllProxiesFailedError) and issubclass(auth, ProxyAuthenticationFailed)
    assert issubclass(auth, urllib3.exceptions.ProxyError) and issubclass(ReportFailedError, ReportFailed)


def test_http_through_auth_proxy_with_special_credentials(
    make_broker: MakeBroker, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    broker = make_broker([auth_http_proxy])
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        for _ in range(3):
            body = echo(pm.request("GET", f"{target.url}/echo", headers=CLOSE))
            assert body["peer_ip"] == auth_http_proxy.outbound_ip
            assert broker.held == 0  # released before request() returned
    assert len(target.requests) == 3
    assert not target.saw_header("Proxy-Authorization")


def test_https_through_connect_tunnel(
    make_broker: MakeBroker, auth_http_proxy: KitProxy, tls_target: TargetServer
) -> None:
    broker = make_broker([auth_http_proxy])
    with PharoxProxyManager(broker, ca_certs=tls_target.ca_bundle, timeout=TIMEOUT) as pm:
        bodies = [echo(pm.request("GET", f"{tls_target.url}/echo")) for _ in range(3)]
        assert len(pm.pools) == 1  # one tunnel pool for proxy+host, reused
    assert {b["tls"] for b in bodies} == {True}
    assert {b["peer_ip"] for b in bodies} == {auth_http_proxy.outbound_ip}
    assert len({b["peer_port"] for b in bodies}) == 1  # kept alive through the tunnel
    assert not tls_target.saw_header("Proxy-Authorization")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_socks5_with_special_credentials(
    make_broker: MakeBroker, socks5_proxy: KitProxy, target: TargetServer, tls_target: TargetServer, scheme: str
) -> None:
    site = target if scheme == "http" else tls_target
    broker = make_broker([socks5_proxy])
    with PharoxProxyManager(broker, ca_certs=tls_target.ca_bundle, timeout=TIMEOUT) as pm:
        for _ in range(2):
            assert echo(pm.request("GET", f"{site.url}/echo"))["peer_ip"] == socks5_proxy.outbound_ip
    assert site.hits[socks5_proxy.outbound_ip] == 2
    assert not site.saw_header("Proxy-Authorization")


def test_socks4(make_broker: MakeBroker, socks4_proxy: KitProxy, target: TargetServer) -> None:
    with PharoxProxyManager(make_broker([socks4_proxy]), timeout=TIMEOUT) as pm:
        assert echo(pm.request("GET", f"{target.url}/echo"))["peer_ip"] == socks4_proxy.outbound_ip


def test_rotates_over_the_pool(make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer) -> None:
    with PharoxProxyManager(make_broker(proxy_trio), timeout=TIMEOUT) as pm:
        for _ in range(6):
            echo(pm.request("GET", f"{target.url}/echo"))
    assert target.hits == Counter({p.outbound_ip: 2 for p in proxy_trio})


# -- urllib3 behaviours users rely on -------------------------------------------------


def test_headers_merge_like_urllib3(make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer) -> None:
    """Same request through plain ProxyManager and ours: the target sees the same headers."""
    seen = []
    plain = urllib3.ProxyManager(http_proxy.url, headers={"X-Base": "1"}, timeout=TIMEOUT)
    ours = PharoxProxyManager(make_broker([http_proxy]), headers={"X-Base": "1"}, timeout=TIMEOUT)
    for manager in (plain, ours):
        with manager:
            default = echo(manager.request("GET", f"{target.url}/echo"))["headers"]
            given = echo(manager.request("GET", f"{target.url}/echo", headers={"X-Given": "2"}))["headers"]
            seen.append((default, given))
    (plain_default, plain_given), (our_default, our_given) = seen
    assert our_default == plain_default and our_default["X-Base"] == "1"
    assert our_given == plain_given and "X-Base" not in our_given and our_given["X-Given"] == "2"


def test_request_encode_body_and_url(make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer) -> None:
    with PharoxProxyManager(make_broker([http_proxy]), timeout=TIMEOUT) as pm:
        posted = echo(pm.request("POST", f"{target.url}/echo", fields={"a": "1"}, encode_multipart=False))
        got = echo(pm.request_encode_url("GET", f"{target.url}/echo", fields={"q": "x y"}))
        sent = echo(pm.urlopen("PUT", f"{target.url}/echo", body=b"raw"))
    assert posted["body"] == "a=1" and got["args"] == {"q": ["x y"]} and sent["body"] == "raw"


def test_redirect_hops_lease_and_report_each(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker(proxy_trio)
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        r = pm.request("GET", f"{target.url}/redirect?to=/redirect%3Fto%3D/echo")
        body = echo(r)
        assert r.retries is not None and [h.status for h in r.retries.history] == [302, 302]
        hops = target.requests
        assert [h.path.split("?")[0] for h in hops] == ["/redirect", "/redirect", "/echo"]
        # Round robin: each hop went through the next proxy, and was reported against it.
        assert len({h.peer_ip for h in hops}) == 3 and body["peer_ip"] == hops[-1].peer_ip
        assert broker.counters["acquired"] == 3
        for proxy in broker.proxies():
            assert broker.proxy_stats(proxy.id)["requests"] == 1
        assert pm.request("GET", f"{target.url}/redirect?to=/echo", redirect=False).status == 302


@pytest.mark.parametrize("code", [303, 307])
def test_redirects_rewrite_requests_like_urllib3(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer, code: int
) -> None:
    """The door follows redirects itself: a POST sent across hosts through plain
    ProxyManager and ours must arrive the same (303: a GET without body or body
    headers; 307: the same POST; Authorization dropped across hosts), except that
    ours names the new host in `Host` where plain urllib3 keeps the first one."""
    elsewhere = quote(f"http://localhost:{target.port}/echo", safe="")
    url = f"{target.url}/redirect?code={code}&to={elsewhere}"
    headers = {**CLOSE, "Content-Type": "text/plain", "Authorization": "Bearer t", "X-Keep": "1"}
    seen = []
    plain = urllib3.ProxyManager(http_proxy.url, timeout=TIMEOUT)
    ours = PharoxProxyManager(make_broker([http_proxy]), timeout=TIMEOUT)
    for manager in (plain, ours):
        with manager:
            body = echo(manager.request("POST", url, body=b"payload", headers=headers))
            seen.append({key: body[key] for key in ("method", "body", "headers")})
    assert seen[0]["headers"].pop("Host") == f"127.0.0.1:{target.port}"  # urllib3 2.8's stale Host
    assert seen[1]["headers"].pop("Host") == f"localhost:{target.port}"
    assert seen[1] == seen[0]
    assert seen[1]["method"] == ("GET" if code == 303 else "POST")
    assert "Authorization" not in seen[1]["headers"] and seen[1]["headers"]["X-Keep"] == "1"
    assert ("Content-Type" in seen[1]["headers"]) is (code == 307)

def test_streamed_redirects_hold_only_the_last_hops_lease(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    """With ``preload_content=False`` a redirect followed gives its lease back at once (its
    outcome recorded); the answer returned holds its own until read, a 302 returned
    unfollowed (out of redirects, `raise_on_redirect=False`) included."""
    broker = make_broker(proxy_trio)
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        r = pm.request("GET", f"{target.url}/redirect?to=/echo", preload_content=False)
        assert r.status == 200 and broker.held == 1 and broker.counters["acquired"] == 2
        assert echo(r)["path"] == "/echo" and broker.held == 0
        chain = f"{target.url}/redirect?to=" + quote("/redirect?to=/echo", safe="")
        r = pm.request("GET", chain, preload_content=False, retries=Retry(redirect=0, raise_on_redirect=False))
        assert r.status == 302 and broker.held == 1
        r.drain_conn()
        assert broker.held == 0
    assert sum(broker.proxy_stats(p.id)["requests"] for p in broker.proxies()) == 3



def test_too_many_redirects_is_not_the_proxys_fault(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer
) -> None:
    broker = make_broker([http_proxy], policy=HealthPolicy(max_failures=1))
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        chain = f"{target.url}/redirect?to=" + quote("/redirect?to=/echo", safe="")
        with pytest.raises(MaxRetryError) as raised:
            pm.request("GET", chain, retries=Retry(redirect=1))
        assert not isinstance(raised.value, AllProxiesFailedError)
        r = pm.request("GET", chain, retries=Retry(redirect=1, raise_on_redirect=False))
        assert r.status == 302 and len(target.requests) == 4
    assert statuses(broker) == {http_proxy.port: ProxyStatus.ACTIVE}
    assert broker.counters["failures"] == 0


def test_target_certificate_failure_is_not_the_proxys_fault(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], tls_target: TargetServer
) -> None:
    broker = make_broker(proxy_trio, policy=HealthPolicy(max_failures=1))
    with PharoxProxyManager(broker, timeout=TIMEOUT, retries=False) as pm:  # no kit CA: verification fails
        for _ in range(2):
            with pytest.raises(urllib3.exceptions.SSLError):
                pm.request("GET", f"{tls_target.url}/echo")
    assert set(statuses(broker).values()) == {ProxyStatus.ACTIVE}
    assert broker.counters["acquired"] == 2  # not moved: another proxy would not help


def test_retry_semantics_for_target_errors_stay_urllib3s(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker(proxy_trio, policy=HealthPolicy(max_failures=1))
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        assert pm.request("GET", f"{target.url}/status/500").status == 500  # answered, not moved
        assert target.hits.total() == 1
        with pytest.raises(MaxRetryError):
            pm.request(
                "GET", f"{target.url}/status/503", retries=Retry(total=2, status_forcelist=[503], backoff_factor=0)
            )
        assert target.hits.total() == 1 + 3  # urllib3 retried on the same pool
    assert set(statuses(broker).values()) == {ProxyStatus.ACTIVE}
    assert broker.counters["failures"] == 0


# -- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("finish", ["read", "stream", "release_conn", "drain_conn", "close", "gc"])
def test_streaming_holds_the_lease_until_the_body_is_done(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer, finish: str
) -> None:
    n = 300_000
    broker = make_broker([http_proxy])
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        r = pm.request("GET", f"{target.url}/bytes?n={n}&chunk=8192", preload_content=False)
        assert broker.held == 1 and pm.held == 1
        if finish == "stream":  # chunk by chunk: a partial read() first would break chunk framing
            chunks = r.stream(4096)
            assert len(next(chunks)) > 0 and broker.held == 1
            assert sum(len(c) for c in chunks) > 0
        else:
            assert len(r.read(1000)) == 1000
            assert broker.held == 1
        if finish == "read":
            assert len(r.read()) == n - 1000
        elif finish == "stream":
            pass
        elif finish == "gc":
            del r
            gc.collect()
        else:
            getattr(r, finish)()
        assert broker.held == 0 and pm.held == 0
        # The proxy's pool is still usable afterwards.
        assert pm.request("GET", f"{target.url}/bytes?n=10").data == expected_bytes(10)


def test_clear_releases_leases_still_held(make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer) -> None:
    broker = make_broker([http_proxy])
    pm = PharoxProxyManager(broker, timeout=TIMEOUT)
    responses = [pm.request("GET", f"{target.url}/bytes?n=100000", preload_content=False) for _ in range(2)]
    assert broker.held == 2
    with pm:
        pass  # leaving the block clears
    assert broker.held == 0 and len(pm.pools) == 0
    for r in responses:
        r.close()  # releasing again is harmless
    assert broker.counters["released"] == 2


def test_pools_bounded_across_proxies_and_eviction_spares_a_stream(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer
) -> None:
    # Ten entries of one no-auth proxy.py, told apart by credentials: ten pool keys.
    entries = [f"http://user{i}:pw@127.0.0.1:{http_proxy.port}" for i in range(10)]
    broker = make_broker(entries)
    n = 200_000
    with PharoxProxyManager(broker, num_pools=3, timeout=TIMEOUT) as pm:
        stream = pm.request("GET", f"{target.url}/bytes?n={n}", preload_content=False)
        first_pool = stream._pool  # type: ignore[attr-defined]
        head = stream.read(100)
        for _ in range(12):
            assert pm.request("GET", f"{target.url}/echo", headers=CLOSE).status == 200
            assert len(pm.pools) <= 3
        deadline = time.monotonic() + 5
        while first_pool.pool is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # evicted pools are closed on a background thread
        assert first_pool.pool is None  # evicted and closed...
        assert head + stream.read() == expected_bytes(n)  # ...without breaking the stream
        assert broker.held == 0


def test_an_evicted_pool_in_use_is_closed_only_after_its_request(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer
) -> None:
    """The race of urllib3 issue #1252, made deterministic: a pool handed out, then
    evicted by other requests before it is used."""
    broker = make_broker([f"http://user{i}:pw@127.0.0.1:{http_proxy.port}" for i in range(4)])
    with PharoxProxyManager(broker, num_pools=1, timeout=TIMEOUT) as pm:
        with pm.leased() as lease:
            pool = pm.connection_from_url(target.url)
            for _ in range(3):  # other proxies: each evicts the one pool before it
                assert pm.request("GET", f"{target.url}/status/204").status == 204
            assert pool.pool is not None  # evicted, but still ours
            r = pool.urlopen("GET", f"{target.url}/echo", assert_same_host=False, headers=CLOSE)
            broker.report(lease, status_code=r.status)
            assert echo(r)["peer_ip"] == http_proxy.outbound_ip
        deadline = time.monotonic() + 5
        while pool.pool is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.pool is None  # closed once the lease let go of it


def test_clear_spares_a_pool_in_use_until_its_request_ends(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer
) -> None:
    """`clear()` from another thread (a shutdown) while a request holds a pool it has
    not yet taken a connection from: the pool stays open for that request and is
    closed once it ends, as an evicted one is."""
    broker = make_broker([http_proxy])
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        assert pm.request("GET", f"{target.url}/status/204").status == 204
        with pm.leased() as lease:
            pool = pm.connection_from_url(f"{target.url}/echo")  # the cached one, now in use
            assert len(pm.pools) == 1
            clearing = threading.Thread(target=pm.clear)
            clearing.start()
            clearing.join()
            assert len(pm.pools) == 0 and pool.pool is not None  # dropped, but still ours
            r = pool.urlopen("GET", f"{target.url}/echo", assert_same_host=False, headers=CLOSE)
            broker.report(lease, status_code=r.status)
            assert echo(r)["peer_ip"] == http_proxy.outbound_ip
        deadline = time.monotonic() + 5
        while pool.pool is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.pool is None  # closed once the lease let go of it
        assert pm.request("GET", f"{target.url}/status/204").status == 204  # a fresh pool
        assert pm.pools[next(iter(pm.pools))] is not pool


def test_eviction_never_closes_a_pool_a_thread_is_using(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer
) -> None:
    """8 threads rotating over 12 proxies through 2 pools: constant eviction, and no
    request may meet a pool closed under it (ClosedPoolError, urllib3 issue #1252)."""
    broker = make_broker([f"http://user{i}:pw@127.0.0.1:{http_proxy.port}" for i in range(12)])
    failures: list[BaseException] = []
    done = Counter[int]()

    def work(pm: PharoxProxyManager) -> None:
        for _ in range(30):
            try:
                done[pm.request("GET", f"{target.url}/status/204", retries=False).status] += 1
            except Exception as exc:
                failures.append(exc)

    with PharoxProxyManager(broker, num_pools=2, timeout=TIMEOUT) as pm:
        threads = [threading.Thread(target=work, args=(pm,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(pm.pools) <= 2
    assert not failures, [describe(e) for e in failures[:5]]
    assert done == {204: 240}


# -- health: bans, dead proxies, moves ------------------------------------------------------


def test_ban_moves_the_request_and_benches_the_proxy(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    banned = proxy_trio[0]
    target.ban(banned.outbound_ip)
    broker = make_broker(proxy_trio)
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        for _ in range(6):
            assert echo(pm.request("GET", f"{target.url}/echo"))["peer_ip"] != banned.outbound_ip
    assert statuses(broker)[banned.port] == ProxyStatus.ACTIVE  # banned by this site only
    assert broker.health(site=target.url).site_banned == 1
    assert target.hits[banned.outbound_ip] == 1


def test_ban_with_no_moves_left_returns_the_ban_response(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    for p in proxy_trio:
        target.ban(p.outbound_ip, status=429)
    broker = make_broker(proxy_trio, acquire_timeout=0.2)
    with PharoxProxyManager(broker, max_moves=1, timeout=TIMEOUT) as pm:
        r = pm.request("GET", f"{target.url}/echo", preload_content=False)
        assert r.status == 429 and target.hits.total() == 2
        assert broker.held == 1  # the answer is the user's; its lease goes with it
        r.drain_conn()  # read the ban page out and give the connection back
        assert broker.held == 0
        assert pm.request("GET", f"{target.url}/echo").status == 429  # the last one left bans too
        assert target.hits.total() == 3 and broker.held == 0
        with pytest.raises(NoProxyAvailableError) as raised:  # all three benched now
            pm.request("GET", f"{target.url}/echo")
    assert "'default'" in str(raised.value) and isinstance(raised.value, HTTPError)


def test_dead_proxy_fails_over_and_goes_inactive(
    make_broker: MakeBroker, proxy_kit: Any, http_proxy: KitProxy, target: TargetServer
) -> None:
    dead = proxy_kit.dead()
    broker = make_broker([dead, http_proxy], policy=HealthPolicy(max_failures=2))
    with PharoxProxyManager(broker, timeout=TIMEOUT, retries=Retry(connect=0, backoff_factor=0)) as pm:
        for _ in range(6):
            assert echo(pm.request("GET", f"{target.url}/echo"))["peer_ip"] == http_proxy.outbound_ip
    assert statuses(broker)[dead.port] == ProxyStatus.INACTIVE
    assert statuses(broker)[http_proxy.port] == ProxyStatus.ACTIVE


def test_every_proxy_failing_raises_a_max_retry_error_naming_each(
    make_broker: MakeBroker, proxy_kit: Any, target: TargetServer
) -> None:
    dead = [proxy_kit.dead(), proxy_kit.dead()]
    broker = make_broker(
        [f"http://{quote(SPECIAL_AUTH[0], safe='')}:{quote(SPECIAL_AUTH[1], safe='')}@127.0.0.1:{d.port}" for d in dead]
    )
    with PharoxProxyManager(broker, max_moves=1, retries=False) as pm, pytest.raises(MaxRetryError) as raised:
        pm.request("GET", f"{target.url}/echo")
    error = raised.value
    assert isinstance(error, AllProxiesFailedError) and isinstance(error, HTTPError)
    assert len(error.attempts) == 2 and {a.outcome for a in error.attempts} == {"failure"}
    assert all(f"127.0.0.1:{d.port}" in str(error) for d in dead)
    assert error.reason is not None and error.url == f"{target.url}/echo"
    assert_no_secret(str(error), repr(error), repr(error.reason), str(pickle.loads(pickle.dumps(error))))


@pytest.mark.parametrize("max_moves", [None, 0])
def test_one_dead_proxy_is_named_once(
    make_broker: MakeBroker, proxy_kit: Any, target: TargetServer, max_moves: int | None
) -> None:
    """With a single proxy there is nowhere to move: the caller gets AllProxiesFailedError
    (a MaxRetryError) naming that proxy once, whatever the move budget."""
    dead = proxy_kit.dead()
    broker = make_broker([dead])
    with PharoxProxyManager(broker, max_moves=max_moves) as pm, pytest.raises(MaxRetryError) as raised:
        pm.request("GET", f"{target.url}/echo", retries=Retry(total=1, backoff_factor=0))
    error = raised.value
    assert isinstance(error, AllProxiesFailedError) and not isinstance(error, NoProxyAvailable)
    assert str(error).count(f"127.0.0.1:{dead.port}") == 1 and "\n" not in str(error)
    assert [a.outcome for a in error.attempts] == ["failure"] and "MaxRetryError" not in str(error)
    assert broker.held == 0 and broker.counters["failures"] == 1


def test_exhausted_pool_raises_no_proxy_available(
    make_broker: MakeBroker, http_proxy: KitProxy, target: TargetServer
) -> None:
    broker = make_broker([http_proxy], max_concurrency=1, acquire_timeout=0.3, pool="shop")
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        held = pm.request("GET", f"{target.url}/bytes?n=50000", preload_content=False)
        with pytest.raises(HTTPError) as raised:
            pm.request("GET", f"{target.url}/echo")
        assert isinstance(raised.value, NoProxyAvailable) and raised.value.pool == "shop"
        assert "'shop'" in str(raised.value)
        held.read()
        assert echo(pm.request("GET", f"{target.url}/echo"))  # free again once the body is read


def test_connection_from_url_needs_a_lease(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker(proxy_trio)
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        with pytest.raises(ProxyNotLeasedError):
            pm.connection_from_url(f"{target.url}/echo")
        with pm.leased() as lease:
            assert pm.current_lease is lease and broker.held == 1
            pool = pm.connection_from_url(f"{target.url}/echo")
            assert pm.connection_from_host(target.host, target.port) is pool
            context = {"scheme": "http", "host": target.host, "port": target.port}
            assert pm.connection_from_context(context) is pool  # urllib3's path, through its pool key
            assert list(pm.pools._container.values())[-1] is pool  # as urllib3's container shows it
            r = pool.urlopen("GET", f"{target.url}/echo", headers=CLOSE, assert_same_host=False)
            assert echo(r)["peer_ip"] == next(p.outbound_ip for p in proxy_trio if p.port == lease.port)
            broker.report(lease, status_code=r.status)
        assert pm.current_lease is None


def test_proxy_crashing_mid_stream_releases_and_moves_on(
    make_broker: MakeBroker, proxy_kit: Any, http_proxy: KitProxy, target: TargetServer
) -> None:
    doomed = proxy_kit.http()
    broker = make_broker([doomed])
    with PharoxProxyManager(broker, timeout=TIMEOUT, retries=Retry(connect=0, backoff_factor=0)) as pm:
        r = pm.request("GET", f"{target.url}/bytes?n=400000&chunk=4096&delay_ms=20", preload_content=False)
        assert echo_ip(target, r) == doomed.outbound_ip
        r.read(4096)
        broker.add_proxies([http_proxy.url])
        doomed.kill()
        with pytest.raises(HTTPError):
            while r.read(65536):
                pass
        assert broker.held == 0  # urllib3 gave the connection up, and the lease with it
        (crashed,) = [p for p in broker.proxies() if p.port == doomed.port]
        assert broker.proxy_stats(crashed.id)["failures"] == 1  # the broken body counts against it
        for _ in range(4):
            assert echo(pm.request("GET", f"{target.url}/echo"))["peer_ip"] == http_proxy.outbound_ip


def test_socks_proxies_without_the_socks_extra(
    make_broker: MakeBroker, socks5_proxy: KitProxy, target: TargetServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: PySocks is installed here, so pretend it is not.
    import importlib.util  # the door asks it whether PySocks is there

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "socks" else real(name, *a))
    broker = make_broker([socks5_proxy], acquire_timeout=0.1)
    with PharoxProxyManager(broker) as pm, pytest.raises(NoProxyAvailableError) as raised:
        pm.request("GET", f"{target.url}/echo")
    assert "pharox-integrations[socks]" in str(raised.value) and target.hits.total() == 0


# -- secrets and threads --------------------------------------------------------------------


def test_no_secret_in_logs_errors_or_reprs(
    make_broker: MakeBroker,
    auth_http_proxy: KitProxy,
    socks5_proxy: KitProxy,
    proxy_kit: Any,
    target: TargetServer,
    tls_target: TargetServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = (
        f"http://{quote(SPECIAL_AUTH[0], safe='')}:{quote(SPECIAL_AUTH[1], safe='')}@127.0.0.1:{proxy_kit.dead().port}"
    )
    broker = make_broker([wrong, auth_http_proxy, socks5_proxy])
    texts = []
    with PharoxProxyManager(broker, ca_certs=tls_target.ca_bundle, timeout=TIMEOUT, retries=False) as pm:
        texts.append(repr(pm))
        for site in (target, tls_target, target, tls_target):
            r = pm.request("GET", f"{site.url}/echo", headers=CLOSE)
            texts += [r.data.decode(), repr(r), repr(r._pool)]  # type: ignore[attr-defined]
        with pm.leased() as lease:
            texts += [repr(lease), str(lease)]
        with pytest.raises(HTTPError) as raised:
            PharoxProxyManager(make_broker([wrong]), retries=False).request("GET", f"{target.url}/echo")
        texts += [str(raised.value), repr(raised.value), repr(broker), str(broker.health())]
        # A SOCKS5 proxy refusing a (longer) password: PySocks' error must not echo it.
        bad_socks = socks5_proxy.url.replace("%40", "%40x", 1).replace("@127", "x@127")
        with pytest.raises(HTTPError) as refused:
            PharoxProxyManager(make_broker([bad_socks]), retries=False).request("GET", f"{target.url}/echo")
        texts += [str(refused.value), repr(refused.value), repr(refused.value.__context__)]
    texts += [record.getMessage() for record in caplog.records]
    assert any("moving the request to another proxy" in t for t in texts)  # the logs were captured
    assert_no_secret(*texts)
    assert not target.saw_header("Proxy-Authorization") and not tls_target.saw_header("Proxy-Authorization")


def test_threads_with_faults_lose_nothing(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], proxy_kit: Any, target: TargetServer
) -> None:
    """8 threads, a banned proxy, a dead one, target errors, half-read streams: every
    request ends with an answer or an HTTPError, and every lease comes back once."""
    target.ban(proxy_trio[2].outbound_ip)
    broker = make_broker([*proxy_trio, proxy_kit.dead()], policy=HealthPolicy(max_failures=2), acquire_timeout=10)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(worker: int, pm: PharoxProxyManager) -> None:
        for i in range(25):
            kind = (worker + i) % 4
            try:
                if kind == 0:
                    result = str(pm.request("GET", f"{target.url}/echo").status)
                elif kind == 1:
                    result = str(pm.request("GET", f"{target.url}/status/500").status)
                elif kind == 2:
                    r = pm.request("GET", f"{target.url}/bytes?n=40000", preload_content=False)
                    r.read(1000)
                    (r.close if i % 2 else r.drain_conn)()
                    result = f"stream {r.status}"
                else:
                    result = str(pm.request("GET", f"{target.url}/redirect?to=/echo").status)
            except HTTPError as exc:
                result = type(exc).__name__
            except BaseException as exc:  # anything else is a bug: keep it for the assert
                errors.append(exc)
                return
            with lock:
                outcomes[result] += 1

    with PharoxProxyManager(broker, num_pools=4, timeout=TIMEOUT, retries=Retry(connect=0, backoff_factor=0)) as pm:
        threads = [threading.Thread(target=work, args=(w, pm)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert sum(outcomes.values()) == 200, outcomes
        assert outcomes["500"] == 50 and outcomes["stream 200"] == 50, outcomes
        # Only a request whose every try met the dead or the banned proxy may fail.
        assert outcomes["200"] >= 95 and set(outcomes) <= {"200", "500", "stream 200", "AllProxiesFailedError"}
        assert len(pm.pools) <= 4
    assert statuses(broker)[proxy_trio[2].port] == ProxyStatus.ACTIVE  # banned by this site only
    assert broker.health(site=target.url).site_banned == 1
    assert target.hits[proxy_trio[2].outbound_ip] <= 8  # banned at once, never again after


# -- a failing judge: ban detector or storage ------------------------------------------


def checked_out(pm: PharoxProxyManager) -> int:
    """Connections taken out of the manager's pools and never given back (a slot lost)."""
    pools = [pm.pools[key] for key in pm.pools.keys()]  # noqa: SIM118  # the LRU refuses iteration
    return sum(p.pool.maxsize - p.pool.qsize() for p in pools if p.pool is not None)


def assert_all_back(broker: LeaseBroker, pm: PharoxProxyManager) -> None:
    assert broker.held == 0 and pm.held == 0, broker.held_leases()
    give_back_kept_slots(broker)
    assert [p.current_leases for p in broker.proxies()] == [0] * len(broker.proxies())
    assert broker.counters["released"] == broker.counters["acquired"]
    assert checked_out(pm) == 0


@pytest.mark.parametrize("path", ["/echo", "/redirect?to=/echo"], ids=["answer", "redirect"])
@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "streamed"])
def test_a_ban_detector_that_raises_gives_everything_back(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer, preload: bool, path: str
) -> None:
    """A bug in the user's ban detector (judging an answer or a redirect) reaches the
    caller as this door's HTTPError naming it (the bug itself as `__cause__`); the lease,
    the proxy's count and the connection all go back, the proxy is not judged, and the
    next request works."""
    broken = [True]

    def detector(status_code: int | None, response: Any) -> bool | None:
        if broken[0]:
            raise RuntimeError("detector bug")
        return None

    broker = make_broker(proxy_trio, policy=HealthPolicy(ban_detector=detector))
    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        for _ in range(2):
            with pytest.raises(ReportFailedError, match="RuntimeError: detector bug") as raised:
                pm.request("GET", f"{target.url}{path}", preload_content=preload)
            assert isinstance(raised.value, HTTPError) and isinstance(raised.value.__cause__, RuntimeError)
            assert_all_back(broker, pm)
        assert broker.counters["acquired"] == 2
        assert set(statuses(broker).values()) == {ProxyStatus.ACTIVE}  # a detector bug is not the proxy's fault
        broken[0] = False
        r = pm.request("GET", f"{target.url}{path}", preload_content=preload)
        assert echo(r)["peer_ip"] in {p.outbound_ip for p in proxy_trio}
        assert_all_back(broker, pm)
    assert_no_secret(str(raised.value), repr(raised.value))


def storage_unavailable(*args: object) -> None:
    """Stands in for a storage write that fails (fault injection): the health result
    (`apply_health_check_result`) or the site's ban (`sites.store.put`)."""
    raise RuntimeError("storage unavailable")


@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "streamed"])
def test_a_ban_the_storage_cannot_record_gives_everything_back(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer, preload: bool
) -> None:
    """The target bans every proxy and recording the site's ban fails in the storage
    (fault injection: no real storage fails on demand, so `sites.store.put` is replaced
    for the test).  The caller gets this door's HTTPError naming the storage's
    error; the lease, the proxy's count and the connection all go back, and once the
    storage works again so do requests."""
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)
    broker = make_broker(proxy_trio)

    with PharoxProxyManager(broker, timeout=TIMEOUT) as pm:
        broker.sites.store.put = storage_unavailable  # type: ignore[method-assign,assignment]
        try:
            with pytest.raises(ReportFailedError, match="RuntimeError: storage unavailable") as raised:
                pm.request("GET", f"{target.url}/echo", preload_content=preload)
            assert isinstance(raised.value, HTTPError) and isinstance(raised.value.__cause__, RuntimeError)
            assert target.hits.total() == 1  # not moved on: the outcome could not be recorded
            assert_all_back(broker, pm)
        finally:
            del broker.sites.store.put
        for proxy in proxy_trio:
            target.unban(proxy.outbound_ip)
        r = pm.request("GET", f"{target.url}/echo", preload_content=preload)
        assert echo(r)["peer_ip"] in {p.outbound_ip for p in proxy_trio}
        assert_all_back(broker, pm)
    assert_no_secret(str(raised.value), repr(raised.value))


def test_a_failure_the_storage_cannot_record_gives_everything_back(
    make_broker: MakeBroker, proxy_kit: Any, http_proxy: KitProxy, target: TargetServer
) -> None:
    """A dead proxy fails the request and recording it INACTIVE fails in the storage
    (fault injection, as above).  The caller gets this door's HTTPError naming both the
    storage's error and the request's; nothing stays held, and requests work afterwards."""
    dead = proxy_kit.dead()
    broker = make_broker([dead], policy=HealthPolicy(max_failures=1))

    with PharoxProxyManager(broker, retries=False) as pm:
        broker.storage.apply_health_check_result = storage_unavailable  # type: ignore[method-assign,assignment]
        try:
            with pytest.raises(ReportFailedError, match="RuntimeError: storage unavailable") as raised:
                pm.request("GET", f"{target.url}/echo")
            assert f"127.0.0.1:{dead.port}" in str(raised.value) and "Connection refused" in str(raised.value)
            assert_all_back(broker, pm)
        finally:
            del broker.storage.apply_health_check_result
        broker.add_proxies([http_proxy.url])
        assert echo(pm.request("GET", f"{target.url}/echo"))["peer_ip"] == http_proxy.outbound_ip
        assert_all_back(broker, pm)


def test_a_streamed_ban_page_left_unread_gives_its_connection_back(
    make_broker: MakeBroker, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    """Moving a streamed request off a banning proxy closes the ban page unread and puts
    its connection's slot back in the pool: a pool with `block=True` and one slot keeps
    serving that proxy."""
    banned = proxy_trio[0]
    target.ban(banned.outbound_ip)
    broker = make_broker(proxy_trio, policy=HealthPolicy(backoff_base=0.05, backoff_cap=0.05))
    with PharoxProxyManager(broker, timeout=TIMEOUT, maxsize=1, block=True) as pm:
        for _ in range(40):  # until the banned proxy's one slot has served three ban pages
            r = pm.request("GET", f"{target.url}/echo", preload_content=False, pool_timeout=2)
            assert echo_ip(target, r) != banned.outbound_ip
            r.drain_conn()
            assert_all_back(broker, pm)
            if target.hits[banned.outbound_ip] >= 3:
                break
            time.sleep(0.06)  # the banned proxy comes back (and the round robin reaches it)
        assert target.hits[banned.outbound_ip] >= 3
