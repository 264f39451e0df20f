"""Self-tests of the real-server kit: if these fail, door tests cannot be trusted."""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import requests
import urllib3
from urllib3.contrib.socks import SOCKSProxyManager

if not __package__:  # pytest's default rootdir import: tests/ is on sys.path
    from servers import (
        SPECIAL_AUTH,
        KitProxy,
        ProxyKit,
        ProxyStartError,
        TargetServer,
        expected_bytes,
    )
else:  # tests/ became a package
    from .servers import (  # type: ignore[import-not-found,no-redef]
        SPECIAL_AUTH,
        KitProxy,
        ProxyKit,
        ProxyStartError,
        TargetServer,
        expected_bytes,
    )

TIMEOUT = 10


def _echo(resp: Any) -> dict[str, Any]:
    data = resp.data if isinstance(resp, urllib3.BaseHTTPResponse) else resp.content
    return json.loads(data)  # type: ignore[no-any-return]


def ssl_context(server: TargetServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=server.ca_bundle)


def _via(proxy: KitProxy | Any) -> dict[str, str]:
    return {"http": proxy.url, "https": proxy.url}


# -- target ----------------------------------------------------------------
def test_target_endpoints(target: TargetServer) -> None:
    with requests.Session() as s:
        assert s.get(f"{target.url}/status/418", timeout=TIMEOUT).status_code == 418
        assert s.get(f"{target.url}/status/204", timeout=TIMEOUT).content == b""
        echo = s.post(f"{target.url}/echo?a=1&a=2", data=b"hi", timeout=TIMEOUT).json()
        assert echo["method"] == "POST" and echo["args"] == {"a": ["1", "2"]}
        assert echo["body"] == "hi" and echo["peer_ip"] == "127.0.0.1"
        r = s.get(f"{target.url}/redirect?to=/status/201", timeout=TIMEOUT)
        assert r.status_code == 201 and r.history[0].status_code == 302
        assert s.get(f"{target.url}/slow?ms=50", timeout=TIMEOUT).json() == {"slept_ms": 50}
        page = s.get(f"{target.url}/page/2?n=7", timeout=TIMEOUT).text
        assert 'href="/page/5?n=7"' in page and 'href="/page/6?n=7"' in page
        leaf = s.get(f"{target.url}/page/3?n=7", timeout=TIMEOUT).text
        assert "href" not in leaf
    assert target.hits["127.0.0.1"] == 8  # the redirect counts twice


def test_drop_closes_without_response(target: TargetServer) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{target.url}/drop", timeout=TIMEOUT)
    assert target.hits["127.0.0.1"] == 1


def test_bytes_streams_chunked(target: TargetServer) -> None:
    n = 3 * 1024 * 1024 + 7
    with requests.get(f"{target.url}/bytes?n={n}&chunk=65536", stream=True, timeout=TIMEOUT) as r:
        assert r.headers["Transfer-Encoding"] == "chunked"
        pieces = list(r.iter_content(chunk_size=None))
    assert len(pieces) > 1
    assert b"".join(pieces) == expected_bytes(n)


def test_keep_alive_reuses_the_connection(target: TargetServer) -> None:
    with urllib3.HTTPConnectionPool(target.host, target.port, maxsize=1) as pool:
        ports = {_echo(pool.request("GET", "/echo"))["peer_port"] for _ in range(3)}
    assert len(ports) == 1


def test_fifty_concurrent_connections(target: TargetServer) -> None:
    def fetch(i: int) -> int:
        with urllib3.HTTPConnectionPool(target.host, target.port, retries=False) as pool:
            return pool.request("GET", f"/slow?ms=300&i={i}").status

    with ThreadPoolExecutor(60) as ex:
        statuses = list(ex.map(fetch, range(60)))
    assert statuses == [200] * 60


def test_reset_forgets_bans_and_hits(target: TargetServer) -> None:
    target.ban("127.0.0.1", status=429)
    assert requests.get(f"{target.url}/echo", timeout=TIMEOUT).status_code == 429
    target.reset()
    assert requests.get(f"{target.url}/echo", timeout=TIMEOUT).status_code == 200
    assert target.hits == {"127.0.0.1": 1}
    assert len(target.seen_headers) == 1


# -- HTTP proxies (proxy.py) -------------------------------------------------
def test_http_proxy_forwards_from_its_outbound_ip(proxy_kit: ProxyKit, target: TargetServer) -> None:
    proxy = proxy_kit.http()
    with urllib3.ProxyManager(proxy.url) as pm:
        echo = _echo(pm.request("GET", f"{target.url}/echo", timeout=TIMEOUT))
    assert echo["peer_ip"] == proxy.outbound_ip != "127.0.0.1"
    assert "proxy.py" in echo["headers"]["Via"]


def test_special_credentials_in_url_work(auth_http_proxy: KitProxy, target: TargetServer) -> None:
    assert auth_http_proxy.auth == SPECIAL_AUTH
    assert "%40" in auth_http_proxy.url and "@" not in auth_http_proxy.safe_url
    assert "p@ss" not in repr(auth_http_proxy) and "%40" not in repr(auth_http_proxy)
    r = requests.get(f"{target.url}/echo", proxies=_via(auth_http_proxy), timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json()["peer_ip"] == auth_http_proxy.outbound_ip
    assert not target.saw_header("Proxy-Authorization")


@pytest.mark.parametrize("headers", [{}, {"Proxy-Authorization": "Basic d3Jvbmc6d3Jvbmc="}])
def test_auth_proxy_answers_407_without_valid_credentials(
    auth_http_proxy: KitProxy, target: TargetServer, headers: dict[str, str]
) -> None:
    with urllib3.ProxyManager(auth_http_proxy.safe_url, proxy_headers=headers) as pm:
        r = pm.request("GET", f"{target.url}/echo", timeout=TIMEOUT, retries=False)
    assert r.status == 407
    assert target.hits.total() == 0


def test_connect_tunnel_verifies_with_kit_ca(auth_http_proxy: KitProxy, tls_target: TargetServer) -> None:
    assert tls_target.ca_bundle and os.path.exists(tls_target.ca_bundle)
    r = requests.get(
        f"{tls_target.url}/echo", proxies=_via(auth_http_proxy), verify=tls_target.ca_bundle, timeout=TIMEOUT
    )
    assert r.status_code == 200
    assert r.json()["tls"] is True
    assert r.json()["peer_ip"] == auth_http_proxy.outbound_ip
    # The CONNECT carried Proxy-Authorization; the tunnelled request must not.
    assert tls_target.seen_headers and not tls_target.saw_header("Proxy-Authorization")


def test_tls_target_is_not_trusted_without_the_kit_ca(http_proxy: KitProxy, tls_target: TargetServer) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{tls_target.url}/echo", proxies=_via(http_proxy), timeout=TIMEOUT)


def test_proxy_authorization_never_reaches_target_over_plain_http(
    proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    for proxy in proxy_trio:
        with urllib3.ProxyManager(proxy.url, proxy_headers=proxy.proxy_headers) as pm:
            assert pm.request("GET", f"{target.url}/echo", timeout=TIMEOUT).status == 200
    assert len(target.seen_headers) == 3
    assert not target.saw_header("Proxy-Authorization")


def test_one_pooled_proxy_connection_serves_two_targets_correctly(
    auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    # Clients pool plain-HTTP proxy connections per proxy, not per target.
    # proxy.py alone would send the 2nd request to the 1st target and leak
    # Proxy-Authorization on it (see proxypy_plugin.py).
    other = TargetServer()
    try:
        with urllib3.ProxyManager(auth_http_proxy.url, proxy_headers=auth_http_proxy.proxy_headers, maxsize=1) as pm:
            for server in (target, other, target, other):
                echo = _echo(pm.request("GET", f"{server.url}/echo", timeout=TIMEOUT))
                assert echo["headers"]["Host"] == f"{server.host}:{server.port}"
        for server in (target, other):
            assert server.hits == {auth_http_proxy.outbound_ip: 2}
            assert not server.saw_header("Proxy-Authorization")
    finally:
        other.close()


def test_trio_members_have_own_credentials_and_ips(proxy_trio: list[KitProxy], target: TargetServer) -> None:
    assert len({p.outbound_ip for p in proxy_trio}) == 3
    assert len({p.auth for p in proxy_trio}) == 3
    first, second = proxy_trio[0], proxy_trio[1]
    # The first proxy's credentials are refused by the second proxy.
    with urllib3.ProxyManager(second.safe_url, proxy_headers=first.proxy_headers) as pm:
        assert pm.request("GET", f"{target.url}/echo", retries=False).status == 407


def test_banning_one_ip_bans_one_proxy(
    proxy_trio: list[KitProxy], target: TargetServer, tls_target: TargetServer
) -> None:
    banned = proxy_trio[1]
    for server in (target, tls_target):
        server.ban(banned.outbound_ip, status=403)

    def statuses(server: TargetServer) -> list[int]:
        return [
            requests.get(
                f"{server.url}/echo", proxies=_via(p), timeout=TIMEOUT, verify=server.ca_bundle or True
            ).status_code
            for p in proxy_trio
        ]

    assert statuses(target) == [200, 403, 200]
    assert statuses(tls_target) == [200, 403, 200]
    assert target.hits == {p.outbound_ip: 1 for p in proxy_trio}
    target.unban(banned.outbound_ip)
    assert statuses(target) == [200, 200, 200]


# These two run in file order: the second checks the first's damage was undone.
def test_trio_member_killed_by_a_test(proxy_trio: list[KitProxy]) -> None:
    proxy_trio[0].kill()
    proxy_trio[2].stop()
    assert not proxy_trio[0].alive and not proxy_trio[2].alive


def test_trio_is_whole_again_for_the_next_test(proxy_trio: list[KitProxy], target: TargetServer) -> None:
    for proxy in proxy_trio:
        r = requests.get(f"{target.url}/echo", proxies=_via(proxy), timeout=TIMEOUT)
        assert r.json()["peer_ip"] == proxy.outbound_ip


def test_fifty_concurrent_requests_through_one_proxy(http_proxy: KitProxy, target: TargetServer) -> None:
    with urllib3.ProxyManager(http_proxy.url, maxsize=50, block=True) as pm:

        def fetch(i: int) -> int:
            return pm.request("GET", f"{target.url}/slow?ms=100&i={i}", timeout=TIMEOUT).status

        with ThreadPoolExecutor(50) as ex:
            statuses = list(ex.map(fetch, range(50)))
    assert statuses == [200] * 50
    assert target.hits == {http_proxy.outbound_ip: 50}


def test_explicit_outbound_ip(proxy_kit: ProxyKit, target: TargetServer) -> None:
    proxy = proxy_kit.http(outbound_ip="127.0.3.7")
    socks = proxy_kit.socks5(outbound_ip="127.0.3.8")
    for p in (proxy, socks):
        r = requests.get(f"{target.url}/echo", proxies=_via(p), timeout=TIMEOUT)
        assert r.json()["peer_ip"] == p.outbound_ip
    assert target.hits == {"127.0.3.7": 1, "127.0.3.8": 1}


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_httpx_through_the_kit(
    auth_http_proxy: KitProxy, socks5_proxy: KitProxy, tls_target: TargetServer, kind: str
) -> None:
    proxy = auth_http_proxy if kind == "http" else socks5_proxy
    with httpx.Client(proxy=proxy.url, verify=ssl_context(tls_target)) as client:
        r = client.get(f"{tls_target.url}/echo", timeout=TIMEOUT)
    assert r.json()["peer_ip"] == proxy.outbound_ip
    assert not tls_target.saw_header("Proxy-Authorization")


# -- SOCKS proxies (pproxy) ---------------------------------------------------
@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_socks5_with_auth(socks5_proxy: KitProxy, target: TargetServer, scheme: str) -> None:
    url = socks5_proxy.url.replace("socks5://", f"{scheme}://")
    with SOCKSProxyManager(url) as pm:
        echo = _echo(pm.request("GET", f"{target.url}/echo", timeout=TIMEOUT))
    assert echo["peer_ip"] == socks5_proxy.outbound_ip


def test_socks5_refuses_missing_or_wrong_credentials(socks5_proxy: KitProxy, target: TargetServer) -> None:
    wrong = socks5_proxy.url.replace("p%40ss", "nope")
    for url in (socks5_proxy.safe_url, wrong):
        with SOCKSProxyManager(url) as pm, pytest.raises(urllib3.exceptions.HTTPError):
            pm.request("GET", f"{target.url}/echo", timeout=TIMEOUT, retries=False)
    assert target.hits.total() == 0


def test_socks5_to_tls_target(socks5_proxy: KitProxy, tls_target: TargetServer) -> None:
    r = requests.get(f"{tls_target.url}/echo", proxies=_via(socks5_proxy), verify=tls_target.ca_bundle, timeout=TIMEOUT)
    assert r.json()["peer_ip"] == socks5_proxy.outbound_ip


def test_socks4(socks4_proxy: KitProxy, target: TargetServer) -> None:
    with SOCKSProxyManager(socks4_proxy.url) as pm:
        echo = _echo(pm.request("GET", f"{target.url}/echo", timeout=TIMEOUT))
    assert echo["peer_ip"] == socks4_proxy.outbound_ip


# -- failures ------------------------------------------------------------------
def test_dead_proxy_refuses(proxy_kit: ProxyKit, target: TargetServer) -> None:
    dead = proxy_kit.dead()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((dead.host, dead.port), timeout=TIMEOUT)
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get(f"{target.url}/echo", proxies=_via(dead), timeout=TIMEOUT)
    assert target.hits.total() == 0


def test_kill_then_restart_on_the_same_port(proxy_kit: ProxyKit, target: TargetServer) -> None:
    proxy = proxy_kit.socks5(auth=("u", "p"))
    port = proxy.port
    proxy.kill()
    assert not proxy.alive
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{target.url}/echo", proxies=_via(proxy), timeout=TIMEOUT)
    proxy.restart()
    assert proxy.alive and proxy.port == port
    r = requests.get(f"{target.url}/echo", proxies=_via(proxy), timeout=TIMEOUT)
    assert r.json()["peer_ip"] == proxy.outbound_ip


def test_stop_is_graceful_and_idempotent(proxy_kit: ProxyKit) -> None:
    proxy = proxy_kit.http()
    proxy.stop()
    proxy.stop()
    proxy.kill()
    assert not proxy.alive
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT)


@pytest.mark.parametrize("kind", ["http", "socks4"])
def test_start_failure_reports_the_proxy_log(proxy_kit: ProxyKit, kind: str) -> None:
    proxy = proxy_kit.http() if kind == "http" else proxy_kit.socks4()
    proxy.stop()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ProxyStartError, match="in use"):
            proxy.start(busy.getsockname()[1])


# -- environment ---------------------------------------------------------------
@pytest.fixture(scope="module")
def _poisoned_env() -> Iterator[None]:
    # Module scope: set before the autouse per-test fixture runs.
    os.environ["hTTp_PROXY"] = "http://127.0.0.1:9"  # noqa: SIM112 (mixed case on purpose)
    os.environ["ALL_PROXY"] = "socks5://127.0.0.1:9"
    yield
    os.environ.pop("hTTp_PROXY", None)
    os.environ.pop("ALL_PROXY", None)


@pytest.mark.usefixtures("_poisoned_env")
def test_proxy_environment_is_cleared(target: TargetServer) -> None:
    assert not [k for k in os.environ if k.lower().endswith("_proxy")]
    assert requests.get(f"{target.url}/echo", timeout=TIMEOUT).json()["peer_ip"] == "127.0.0.1"
