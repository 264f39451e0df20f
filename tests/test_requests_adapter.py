"""requests door: real HTTP/HTTPS/SOCKS through real proxies to real targets.

Faults under threads live in test_requests_faults.py; the `door` fixture and the
secret checks defined here are shared with it.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import logging
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

import psutil
import pytest
import requests
from brokerhelpers import wait_for

from pharox_integrations import AllProxiesFailed, HealthPolicy, LeaseBroker, NoProxyAvailable
from pharox_integrations.requests import (
    AllProxiesFailedError,
    NoProxyAvailableError,
    PharoxAdapter,
    ProxyAuthenticationError,
    pharox_session,
)

if __package__:
    from .servers import SPECIAL_AUTH, expected_bytes
else:
    from servers import SPECIAL_AUTH, expected_bytes

BAD_AUTH = ("us@r:na/me", "wr@ng:p/w %+ y")


def bad_auth_url(host: str, port: int) -> str:
    """A proxy URL carrying BAD_AUTH (wrong password for the kit's auth proxies)."""
    return f"http://{quote(BAD_AUTH[0], safe='')}:{quote(BAD_AUTH[1], safe='')}@{host}:{port}"


def secrets_of(*auths: tuple[str, str]) -> list[str]:
    """Every form a credential could leak in: raw, percent-encoded, Basic token."""
    out: list[str] = []
    for user, password in auths:
        out += [password, quote(password, safe=""), quote(user, safe="")]
        out.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    return out


SECRETS = [*secrets_of(SPECIAL_AUTH, BAD_AUTH), "p@ss:w/rd", "p%40ss", "wr@ng"]


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in str(text), f"credential leaked into {str(text)[:200]!r}"


def exception_texts(exc: BaseException) -> list[str]:
    """str/repr of an exception and of everything it chains to."""
    out: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        out += [str(cur), repr(cur)]
        todo += [cur.__cause__, cur.__context__, *(a for a in cur.args if isinstance(a, BaseException))]
    return out


def open_connections_to(port: int) -> int:
    """Established TCP connections from this process to `port`."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


class Door:
    """Brokers and sessions of one test; teardown proves no lease was left behind."""

    def __init__(self) -> None:
        self.brokers: list[LeaseBroker] = []
        self.sessions: list[requests.Session] = []

    def broker(self, proxies: Iterable[Any], **kw: Any) -> LeaseBroker:
        kw.setdefault("acquire_timeout", 2.0)
        # Benched proxies stay out for the whole test: outcomes are deterministic.
        kw.setdefault("policy", HealthPolicy(backoff_base=600, backoff_cap=600))
        broker = LeaseBroker.from_proxies([getattr(p, "url", p) for p in proxies], **kw)
        self.brokers.append(broker)
        return broker

    def session(self, broker: LeaseBroker, **kw: Any) -> requests.Session:
        session = pharox_session(broker, **kw)
        self.sessions.append(session)
        return session

    def adapter(self, session: requests.Session) -> PharoxAdapter:
        adapter = session.get_adapter("http://x")
        assert isinstance(adapter, PharoxAdapter)
        return adapter

    def assert_nothing_held(self) -> None:
        for broker in self.brokers:
            assert broker.held == 0, broker.held_leases()
            assert [p.current_leases for p in broker.proxies()] == [0] * len(broker.proxies())
        for session in self.sessions:
            assert self.adapter(session).held == 0

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        for broker in self.brokers:
            broker.close()


@pytest.fixture
def door() -> Iterator[Door]:
    made = Door()
    yield made
    try:
        made.assert_nothing_held()  # before close(), which would release leaks silently
    finally:
        made.close()


# ---------------------------------------------------------------------- protocols


def test_http_through_authenticated_proxy(door: Door, target: Any, auth_http_proxy: Any) -> None:
    broker = door.broker([auth_http_proxy])
    session = door.session(broker)
    r = session.get(f"{target.url}/echo")
    assert broker.held == 0  # stream=False: released before send() returned
    assert r.status_code == 200
    assert r.json()["peer_ip"] == auth_http_proxy.outbound_ip
    assert r.pharox_proxy == auth_http_proxy.safe_url  # type: ignore[attr-defined]
    assert not target.saw_header("Proxy-Authorization")


def test_https_via_connect(door: Door, tls_target: Any, auth_http_proxy: Any) -> None:
    session = door.session(door.broker([auth_http_proxy]))
    r = session.post(f"{tls_target.url}/echo", data=b"hello", verify=tls_target.ca_bundle)
    assert r.status_code == 200
    body = r.json()
    assert (body["tls"], body["body"], body["peer_ip"]) == (True, "hello", auth_http_proxy.outbound_ip)
    assert not tls_target.saw_header("Proxy-Authorization")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_socks5_with_special_credentials(
    door: Door, scheme: str, target: Any, tls_target: Any, socks5_proxy: Any
) -> None:
    server = tls_target if scheme == "https" else target
    session = door.session(door.broker([socks5_proxy]))
    r = session.get(f"{server.url}/echo", verify=tls_target.ca_bundle)
    assert r.status_code == 200
    assert r.json()["peer_ip"] == socks5_proxy.outbound_ip
    assert not server.saw_header("Proxy-Authorization")


def test_socks4(door: Door, target: Any, socks4_proxy: Any) -> None:
    session = door.session(door.broker([socks4_proxy]))
    assert session.get(f"{target.url}/echo").json()["peer_ip"] == socks4_proxy.outbound_ip


def test_socks_proxies_without_the_socks_extra(
    door: Door, monkeypatch: pytest.MonkeyPatch, target: Any, socks5_proxy: Any
) -> None:
    # Fault injection: PySocks is installed here, so pretend it is not.
    import importlib.util  # the adapter asks it whether PySocks is there

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "socks" else real(name, *a))
    session = door.session(door.broker([socks5_proxy], acquire_timeout=0.1))
    with pytest.raises(NoProxyAvailableError) as raised:
        session.get(f"{target.url}/echo")
    assert "pharox-integrations[socks]" in str(raised.value) and target.hits.total() == 0


def test_rotation_over_the_pool(door: Door, target: Any, proxy_trio: Any) -> None:
    session = door.session(door.broker(proxy_trio))
    for _ in range(6):
        assert session.get(f"{target.url}/echo").status_code == 200
    assert {ip: target.hits[ip] for ip in (p.outbound_ip for p in proxy_trio)} == {p.outbound_ip: 2 for p in proxy_trio}


# ---------------------------------------------------------------------- streaming


def test_stream_held_until_closed_after_partial_read(door: Door, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy])
    session = door.session(broker)
    r = session.get(f"{target.url}/bytes?n=200000&chunk=4096", stream=True)
    assert broker.held == 1
    chunks = r.iter_content(1000)
    assert next(chunks) == expected_bytes(1000)
    assert broker.held == 1
    r.close()
    assert broker.held == 0
    r.close()  # twice is harmless
    assert broker.counters["released"] == 1


def test_stream_released_at_end_of_body(door: Door, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy])
    session = door.session(broker)
    r = session.get(f"{target.url}/bytes?n=50000&chunk=1000", stream=True)
    assert b"".join(r.iter_content(4096)) == expected_bytes(50000)
    assert broker.held == 0  # read to the end, never closed


def test_stream_with_block_and_user_exception(door: Door, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy])
    session = door.session(broker)
    with pytest.raises(RuntimeError, match="user bug"):  # noqa: SIM117
        with session.get(f"{target.url}/bytes?n=100000", stream=True) as r:
            for _ in r.iter_content(100):
                assert broker.held == 1
                raise RuntimeError("user bug")
    assert broker.held == 0


def test_stream_abandoned_and_garbage_collected(door: Door, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy])
    session = door.session(broker)

    def read_a_bit_and_fail() -> None:
        r = session.get(f"{target.url}/bytes?n=100000", stream=True)
        next(r.iter_content(10))
        raise RuntimeError("abandoned")

    with contextlib.suppress(RuntimeError):
        read_a_bit_and_fail()  # the traceback (and the response in its frame) dies after this
    gc.collect()
    assert wait_for(lambda: broker.held == 0)


def test_a_proxy_crashing_mid_stream_counts_against_it(door: Door, target: Any, proxy_kit: Any) -> None:
    doomed = proxy_kit.http()
    broker = door.broker([doomed])
    session = door.session(broker)
    r = session.get(f"{target.url}/bytes?n=400000&chunk=4096&delay_ms=20", stream=True)
    assert len(r.raw.read(4096)) == 4096 and broker.held == 1
    doomed.kill()
    with pytest.raises(requests.RequestException):
        for _ in r.iter_content(65536):
            pass
    assert broker.held == 0  # urllib3 gave the connection up, and the lease with it
    (crashed,) = broker.proxies()
    assert broker.proxy_stats(crashed.id)["failures"] == 1  # the broken body is the proxy's failure


def test_stream_raw_close_releases(door: Door, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy])
    session = door.session(broker)
    r = session.get(f"{target.url}/bytes?n=100000", stream=True)
    r.raw.read(10)
    r.raw.close()
    assert wait_for(lambda: broker.held == 0)
    del r


def test_session_close_releases_open_streams(door: Door, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy])
    session = pharox_session(broker)
    responses = [session.get(f"{target.url}/bytes?n=100000", stream=True) for _ in range(3)]
    assert broker.held == 3
    session.close()
    assert broker.held == 0
    assert all(p.current_leases == 0 for p in broker.proxies())
    for r in responses:
        r.close()
    assert broker.counters["released"] == 3


# ---------------------------------------------------------------------- connection pools


def test_per_proxy_pools_are_bounded(door: Door, target: Any, http_proxy: Any) -> None:
    # 30 distinct entries on one real server (it ignores the user names).
    entries = [f"http://user{i}:x@127.0.0.1:{http_proxy.port}" for i in range(30)]
    session = door.session(door.broker(entries), pool_connections=4)
    adapter = door.adapter(session)
    for _ in range(30):
        assert session.get(f"{target.url}/echo").status_code == 200
    assert len(adapter.proxy_manager) == 4
    assert target.hits[http_proxy.outbound_ip] == 30
    # The open connections are bounded too, not just the cache entries.
    assert wait_for(lambda: open_connections_to(http_proxy.port) <= 4), open_connections_to(http_proxy.port)


def test_eviction_does_not_break_a_stream(door: Door, target: Any, proxy_trio: Any) -> None:
    broker = door.broker(proxy_trio)
    session = door.session(broker, pool_connections=1)
    adapter = door.adapter(session)
    streamed = session.get(f"{target.url}/bytes?n=300000&chunk=4096", stream=True)
    chunks = streamed.iter_content(4096)
    first = next(chunks)
    for _ in range(4):  # other proxies evict the streaming one's manager
        assert session.get(f"{target.url}/echo").status_code == 200
    assert len(adapter.proxy_manager) == 1
    rest = b"".join(chunks)
    assert first + rest == expected_bytes(300000)
    assert broker.held == 0


# ---------------------------------------------------------------------- precedence


def test_explicit_proxies_bypass_leasing(door: Door, target: Any, http_proxy: Any, proxy_trio: Any) -> None:
    broker = door.broker(proxy_trio)
    session = door.session(broker)
    r = session.get(f"{target.url}/echo", proxies={"http": http_proxy.url})
    assert r.json()["peer_ip"] == http_proxy.outbound_ip
    assert broker.counters["acquired"] == 0


def test_environment_proxy_never_overrides_the_lease(
    door: Door, monkeypatch: pytest.MonkeyPatch, target: Any, proxy_kit: Any, socks5_proxy: Any
) -> None:
    # An environment proxy with credentials: on redirects Session adds its
    # Proxy-Authorization header; through SOCKS it would reach the target as is.
    dead = proxy_kit.dead()
    monkeypatch.setenv("HTTP_PROXY", bad_auth_url(dead.host, dead.port))
    broker = door.broker([socks5_proxy])
    session = door.session(broker)
    r = session.get(f"{target.url}/redirect?to=/echo")
    assert r.status_code == 200
    assert r.json()["peer_ip"] == socks5_proxy.outbound_ip
    assert broker.counters["acquired"] == 2  # one lease per hop
    assert not target.saw_header("Proxy-Authorization")


def test_no_proxy_hosts_go_direct(door: Door, monkeypatch: pytest.MonkeyPatch, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy])
    session = door.session(broker)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert session.get(f"{target.url}/echo").json()["peer_ip"] == "127.0.0.1"
    monkeypatch.delenv("NO_PROXY")
    assert session.get(f"{target.url}/echo", proxies={"no_proxy": "127.0.0.1"}).json()["peer_ip"] == "127.0.0.1"
    assert broker.counters["acquired"] == 0
    assert session.get(f"{target.url}/echo").json()["peer_ip"] == http_proxy.outbound_ip


# ---------------------------------------------------------------------- errors and secrets


def test_exhausted_pool(door: Door, target: Any, http_proxy: Any) -> None:
    broker = door.broker([http_proxy], pool="shop", max_concurrency=1, acquire_timeout=0.2)
    session = door.session(broker)
    with session.get(f"{target.url}/bytes?n=10000", stream=True), pytest.raises(NoProxyAvailableError) as caught:
        session.get(f"{target.url}/echo")
    assert isinstance(caught.value, requests.RequestException)
    assert isinstance(caught.value, NoProxyAvailable)
    assert "'shop'" in str(caught.value) and caught.value.pool == "shop"
    assert caught.value.request is not None


def test_all_proxies_failed_names_each_without_secrets(
    door: Door, caplog: pytest.LogCaptureFixture, tls_target: Any, proxy_kit: Any, auth_http_proxy: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = bad_auth_url("127.0.0.1", auth_http_proxy.port)
    dead = proxy_kit.dead()
    broker = door.broker([wrong, dead])
    session = door.session(broker, max_moves=1)
    with pytest.raises(AllProxiesFailedError) as caught:
        session.get(f"{tls_target.url}/echo", verify=tls_target.ca_bundle)
    error = caught.value
    assert isinstance(error, requests.ConnectionError) and isinstance(error, AllProxiesFailed)
    by_proxy = {a.proxy: a for a in error.attempts}  # round-robin may start with either
    assert sorted(by_proxy) == sorted([auth_http_proxy.safe_url, dead.safe_url])
    assert by_proxy[auth_http_proxy.safe_url].detail == "HTTP 407"
    assert by_proxy[dead.safe_url].outcome == "failure"
    assert auth_http_proxy.safe_url in str(error) and dead.safe_url in str(error)
    assert_no_secret(*exception_texts(error), caplog.text, repr(broker), repr(door.adapter(session)))
    assert not tls_target.requests  # nothing reached the target


def test_proxy_authentication_error(door: Door, tls_target: Any, target: Any, auth_http_proxy: Any) -> None:
    wrong = bad_auth_url("127.0.0.1", auth_http_proxy.port)
    session = door.session(door.broker([wrong]), max_moves=0)
    with pytest.raises(ProxyAuthenticationError) as caught:
        session.get(f"{tls_target.url}/echo", verify=tls_target.ca_bundle)
    assert isinstance(caught.value, requests.exceptions.ProxyError)
    assert_no_secret(*exception_texts(caught.value))
    # Plain HTTP: the proxy's 407 is the proxy's refusal, never the site's answer.
    with pytest.raises(ProxyAuthenticationError, match="HTTP 407"):
        session.get(f"{target.url}/echo")
    assert not target.requests


def test_target_errors_are_not_the_proxys_fault(door: Door, target: Any, proxy_trio: Any) -> None:
    broker = door.broker(proxy_trio)
    session = door.session(broker)
    for _ in range(5):
        assert session.get(f"{target.url}/status/500").status_code == 500
    assert sum(target.hits.values()) == 5  # no move to another proxy
    assert all(p.status == "active" for p in broker.proxies())


def test_bad_target_certificate_is_not_the_proxys_fault(door: Door, tls_target: Any, proxy_trio: Any) -> None:
    broker = door.broker(proxy_trio)
    session = door.session(broker)
    with pytest.raises(requests.exceptions.SSLError):  # the CA is not trusted: raised as is
        session.get(f"{tls_target.url}/echo")
    assert broker.counters["acquired"] == 1  # not moved to another proxy
    assert all(p.status == "active" for p in broker.proxies())
