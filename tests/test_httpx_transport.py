"""httpx door through real proxies: routing, streams, moves, errors, pool management, secrets."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from pharox import ProxyStatus

from pharox_integrations import HealthPolicy, InvalidProxyURL, LeaseBroker, NoProxyAvailable
from pharox_integrations.httpx import (
    AllProxiesFailedError,
    AsyncPharoxTransport,
    NoProxyAvailableError,
    PharoxTransport,
    ProxyAuthenticationFailedError,
)

if not __package__:
    from brokerhelpers import give_back_kept_slots
    from servers import SPECIAL_AUTH, KitProxy, ProxyKit, TargetServer, expected_bytes
else:  # tests/ became a package
    from .brokerhelpers import give_back_kept_slots  # type: ignore[import-not-found,no-redef]
    from .servers import (  # type: ignore[import-not-found,no-redef]
        SPECIAL_AUTH,
        KitProxy,
        ProxyKit,
        TargetServer,
        expected_bytes,
    )

TIMEOUT = 10
SECRETS = (SPECIAL_AUTH[0], SPECIAL_AUTH[1], "p%40ss", "us%40r")

BrokerFactory = Callable[..., LeaseBroker]


def assert_all_returned(broker: LeaseBroker) -> None:
    """No lease held by this process, and none left on any proxy in the storage."""
    assert broker.held == 0, broker.held_leases()
    give_back_kept_slots(broker)  # a lease block's free slots (shared storage) are not in use
    leftover = {p.host: p.current_leases for p in broker.proxies() if p.current_leases}
    assert not leftover, leftover


@pytest.fixture
def make_broker() -> Iterator[BrokerFactory]:
    """Brokers over the given proxy URLs; every lease must be back at the end of the test."""
    made: list[LeaseBroker] = []

    def make(urls: list[str], **kwargs: Any) -> LeaseBroker:
        kwargs.setdefault("acquire_timeout", 2.0)
        broker = LeaseBroker.from_proxies(urls, **kwargs)
        made.append(broker)
        return broker

    yield make
    try:
        for broker in made:
            assert_all_returned(broker)
    finally:
        for broker in made:
            broker.close()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"credential leaked: {text!r}"


def ctx(server: TargetServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=server.ca_bundle)


def by_host_port(broker: LeaseBroker, proxy: KitProxy) -> Any:
    return next(p for p in broker.proxies() if p.port == proxy.port)


# ---------------------------------------------------------------------- routing


@pytest.mark.parametrize("kind", ["http", "socks5"])
@pytest.mark.parametrize("tls", [False, True], ids=["http-target", "https-target"])
def test_sync_routes_through_the_leased_proxy_with_credentials(
    make_broker: BrokerFactory,
    auth_http_proxy: KitProxy,
    socks5_proxy: KitProxy,
    target: TargetServer,
    tls_target: TargetServer,
    kind: str,
    tls: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = auth_http_proxy if kind == "http" else socks5_proxy
    site = tls_target if tls else target
    broker = make_broker([proxy.url])
    transport = PharoxTransport(broker, verify=ctx(tls_target))
    with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
        response = client.get(f"{site.url}/echo")
    assert response.status_code == 200
    assert response.json()["peer_ip"] == proxy.outbound_ip
    assert response.json()["tls"] is tls
    assert response.extensions["pharox"]["proxy"] == proxy.safe_url
    if tls or kind == "socks5":
        assert not site.saw_header("Proxy-Authorization")
    assert_no_secret(caplog.text, repr(transport), repr(response.extensions))


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["http", "socks5"])
@pytest.mark.parametrize("tls", [False, True], ids=["http-target", "https-target"])
async def test_async_routes_through_the_leased_proxy_with_credentials(
    make_broker: BrokerFactory,
    auth_http_proxy: KitProxy,
    socks5_proxy: KitProxy,
    target: TargetServer,
    tls_target: TargetServer,
    kind: str,
    tls: bool,
) -> None:
    proxy = auth_http_proxy if kind == "http" else socks5_proxy
    site = tls_target if tls else target
    broker = make_broker([proxy.url])
    async with httpx.AsyncClient(
        transport=AsyncPharoxTransport(broker, verify=ctx(tls_target)), timeout=TIMEOUT
    ) as client:
        responses = await asyncio.gather(*(client.get(f"{site.url}/echo") for _ in range(5)))
    assert {r.json()["peer_ip"] for r in responses} == {proxy.outbound_ip}
    if tls or kind == "socks5":
        assert not site.saw_header("Proxy-Authorization")


def test_callers_proxy_authorization_never_rides_the_tunnel(
    make_broker: BrokerFactory, auth_http_proxy: KitProxy, tls_target: TargetServer
) -> None:
    broker = make_broker([auth_http_proxy.url])
    with httpx.Client(transport=PharoxTransport(broker, verify=ctx(tls_target)), timeout=TIMEOUT) as client:
        r = client.get(f"{tls_target.url}/echo", headers={"Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA=="})
    assert r.status_code == 200
    assert not tls_target.saw_header("Proxy-Authorization")


def test_forwarded_plain_http_leaves_proxy_authorization_at_the_proxy(
    make_broker: BrokerFactory, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    # One request per connection: proxy.py 2.4 strips Proxy-Authorization from the first
    # request of a keep-alive client connection only (a proxy defect, see the report).
    broker = make_broker([auth_http_proxy.url])
    for _ in range(2):
        with httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client:
            assert client.get(f"{target.url}/echo", headers={"Proxy-Authorization": "Basic eDp5"}).status_code == 200
    assert len(target.requests) == 2
    assert not target.saw_header("Proxy-Authorization")


# ---------------------------------------------------------------------- streams


def test_sync_stream_holds_the_lease_until_closed(
    make_broker: BrokerFactory, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    broker = make_broker([auth_http_proxy.url])
    with httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client:
        with client.stream("GET", f"{target.url}/bytes?n=200000&chunk=4096") as r:
            assert broker.held == 1
            assert by_host_port(broker, auth_http_proxy).current_leases == 1
            body = b""
            for chunk in r.iter_bytes():
                assert broker.held == 1  # reading, not closed
                body += chunk
            assert broker.held == 0  # httpx closes a stream it has read to the end
        assert body == expected_bytes(200000)
        # Closed early, body unread: released too.
        with client.stream("GET", f"{target.url}/bytes?n=200000&chunk=4096") as r:
            assert broker.held == 1
        assert broker.held == 0
        # A plain request reads and closes: released when client.get returns.
        assert client.get(f"{target.url}/echo").status_code == 200
        assert broker.held == 0


@pytest.mark.asyncio
async def test_async_stream_holds_the_lease_until_aclose(
    make_broker: BrokerFactory, socks5_proxy: KitProxy, tls_target: TargetServer
) -> None:
    broker = make_broker([socks5_proxy.url])
    async with httpx.AsyncClient(
        transport=AsyncPharoxTransport(broker, verify=ctx(tls_target)), timeout=TIMEOUT
    ) as client:
        request = client.build_request("GET", f"{tls_target.url}/bytes?n=100000&chunk=1000")
        response = await client.send(request, stream=True)
        got = b""
        async for chunk in response.aiter_bytes():
            got += chunk
            assert broker.held == 1
            if len(got) >= 10_000:
                break
        assert broker.held == 1
        await response.aclose()
        assert broker.held == 0
        await response.aclose()  # twice is a no-op
    assert broker.counters["released"] == 1
    assert got == expected_bytes(100000)[: len(got)]


@pytest.mark.asyncio
async def test_a_closed_stream_lets_go_of_the_connections_request_objects(
    make_broker: BrokerFactory, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    """httpx's client keeps each response in a reference cycle, so anything a closed
    stream still points at waits for the garbage collector: the leased stream drops
    httpcore's stream (and with it the connection's request objects) when closed."""
    import gc
    import weakref

    broker = make_broker([auth_http_proxy.url])
    async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=TIMEOUT) as client:
        assert (await client.get(f"{target.url}/echo")).status_code == 200  # warm: the connection exists
        gc.collect()
        gc.disable()
        try:
            async with client.stream("GET", f"{target.url}/echo") as response:
                leased = response.stream._stream  # httpx's BoundAsyncStream -> ours
                inner = weakref.ref(leased._inner)
                assert inner() is not None and broker.held == 1
                await response.aread()  # read to the end: httpx closes the stream
            assert inner() is None, "the closed stream still holds httpcore's stream"
            await response.aclose()  # closing again changes nothing
            assert response.content == await response.aread()
        finally:
            gc.enable()
    assert broker.held == 0


def test_a_closed_sync_stream_lets_go_of_the_connections_request_objects(
    make_broker: BrokerFactory, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    import gc
    import weakref

    broker = make_broker([auth_http_proxy.url])
    with httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client:
        gc.collect()
        gc.disable()
        try:
            with client.stream("GET", f"{target.url}/echo") as response:
                inner = weakref.ref(response.stream._stream._inner)
                assert inner() is not None and broker.held == 1
                response.read()
            assert inner() is None, "the closed stream still holds httpcore's stream"
        finally:
            gc.enable()
    assert broker.held == 0


def test_evicted_inner_transport_stays_open_while_its_stream_is_read(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker([p.url for p in proxy_trio])
    transport = PharoxTransport(broker, max_proxy_transports=1)
    with (
        httpx.Client(transport=transport, timeout=TIMEOUT) as client,
        client.stream("GET", f"{target.url}/bytes?n=300000&chunk=1000&delay_ms=1") as streaming,
    ):
        for _ in range(4):  # the other proxies push the streaming one out of the LRU
            assert client.get(f"{target.url}/echo").status_code == 200
        assert transport.proxy_transports == 1
        assert streaming.read() == expected_bytes(300000)
    assert broker.held == 0


# ---------------------------------------------------------------------- moves and errors


def test_banned_proxy_is_benched_and_the_request_moves(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker([p.url for p in proxy_trio])
    banned = proxy_trio[0]
    target.ban(banned.outbound_ip)
    with httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client:
        responses = [client.get(f"{target.url}/echo") for _ in range(6)]
    assert all(r.status_code == 200 for r in responses)
    assert banned.outbound_ip not in {r.json()["peer_ip"] for r in responses}
    assert target.hits[banned.outbound_ip] == 1  # banned once, then never leased again
    moved = [r.extensions["pharox"]["attempts"] for r in responses if r.extensions["pharox"]["attempts"]]
    assert moved == [[f"{banned.safe_url}: ban (HTTP 403)"]]
    assert by_host_port(broker, banned).status == ProxyStatus.ACTIVE  # the site's verdict only
    health = broker.health(site=target.url)
    assert (health.total, health.active, health.banned, health.site_banned) == (3, 3, 0, 1)


@pytest.mark.asyncio
async def test_every_proxy_banned_returns_the_last_ban_then_pool_empty(
    make_broker: BrokerFactory,
    proxy_trio: list[KitProxy],
    target: TargetServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    broker = make_broker([p.url for p in proxy_trio], acquire_timeout=0.2)
    for p in proxy_trio:
        target.ban(p.outbound_ip, 429)
    async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=TIMEOUT) as client:
        last = await client.get(f"{target.url}/echo")
        with pytest.raises(NoProxyAvailableError) as empty:
            await client.get(f"{target.url}/echo")
    assert last.status_code == 429 and last.text == "banned\n"
    attempts = last.extensions["pharox"]["attempts"]
    assert sorted(attempts) == sorted(f"{p.safe_url}: cooldown (HTTP 429)" for p in proxy_trio)
    assert last.extensions["pharox"]["proxy"] in attempts[-1]
    assert sum(target.hits.values()) == 3  # each proxy once
    assert isinstance(empty.value, httpx.TransportError) and isinstance(empty.value, NoProxyAvailable)
    assert "usable for site '127.0.0.1'" in str(empty.value) and "3 cooling, next in" in str(empty.value)
    assert empty.value.request.url.path == "/echo"
    assert_no_secret(str(empty.value), repr(last.extensions), caplog.text)
    assert broker.counters["cooldowns"] == broker.counters["site_cooldowns"] == 3 and broker.counters["bans"] == 0


@pytest.mark.asyncio
async def test_a_ban_detector_that_raises_gives_everything_back(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    """A bug in the user's ban detector surfaces as an httpx error naming it, and the
    proxy, its inner transport and the connection all go back (sync and async)."""

    def detector(status_code: int | None, response: Any) -> bool | None:
        raise RuntimeError("detector bug")

    broker = make_broker([p.url for p in proxy_trio], policy=HealthPolicy(ban_detector=detector))
    sync_transport = PharoxTransport(broker)
    async_transport = AsyncPharoxTransport(broker)
    with httpx.Client(transport=sync_transport, timeout=TIMEOUT) as client:
        for _ in range(2):
            with pytest.raises(httpx.TransportError, match="detector bug"):
                client.get(f"{target.url}/echo")
            assert broker.held == 0
        assert len(sync_transport._routes) == 2 and sync_transport._routes.in_use == 0
    async with httpx.AsyncClient(transport=async_transport, timeout=TIMEOUT) as aclient:
        for _ in range(2):
            with pytest.raises(httpx.TransportError, match="detector bug"):
                await aclient.get(f"{target.url}/echo")
            assert broker.held == 0
        assert len(async_transport._routes) == 2 and async_transport._routes.in_use == 0
    assert broker.counters["acquired"] == broker.counters["released"] == 4


@pytest.mark.asyncio
async def test_a_ban_the_storage_cannot_record_still_gives_everything_back(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    """The target bans every proxy; recording the site's ban fails in the storage (fault
    injection: no real storage fails on demand; `sites.store.put` is replaced).  The caller gets an httpx error, and
    the proxy, the inner transport's in-use count and the connection all go back."""
    broker = make_broker([p.url for p in proxy_trio])
    for proxy in proxy_trio:
        target.ban(proxy.outbound_ip)

    def broken(*args: object) -> None:
        raise RuntimeError("storage unavailable")

    broker.sites.store.put = broken  # type: ignore[method-assign]
    transport = AsyncPharoxTransport(broker)
    try:
        async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
            for _ in range(3):
                with pytest.raises(httpx.TransportError, match="storage unavailable"):
                    await client.get(f"{target.url}/echo")
                assert broker.held == 0
            assert len(transport._routes) > 0 and transport._routes.in_use == 0
            # The connections went back to their pools: none is still serving a request.
            for inner in transport._routes.values():
                pool = inner._pool
                assert all(c.is_idle() or c.is_closed() for c in pool.connections)
    finally:
        del broker.sites.store.put
    assert broker.counters["released"] == broker.counters["acquired"] == 3


@pytest.mark.asyncio
async def test_a_request_cancelled_while_an_evicted_transport_closes_gives_everything_back(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker([p.url for p in proxy_trio])
    transport = AsyncPharoxTransport(broker, max_proxy_transports=1)
    async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
        assert (await client.get(f"{target.url}/echo")).status_code == 200
        # Fault injection: closing the transport the next request evicts hangs (no real
        # transport hangs on demand), and the caller gives up meanwhile.
        (first,) = transport._routes.values()
        closing = first.aclose

        async def hang() -> None:
            await asyncio.sleep(30)

        first.aclose = hang  # type: ignore[method-assign]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.get(f"{target.url}/echo"), 0.5)
        assert broker.held == 0
        assert len(transport._routes) == 1 and transport._routes.in_use == 0
        assert (await client.get(f"{target.url}/echo")).status_code == 200
        await closing()
    assert broker.counters["released"] == broker.counters["acquired"] == 3


def test_raise_on_exhausted_raises_where_the_last_ban_would_be_returned(
    make_broker: BrokerFactory, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    target.ban(auth_http_proxy.outbound_ip)
    broker = make_broker([auth_http_proxy.url])
    with httpx.Client(transport=PharoxTransport(broker, max_moves=0), timeout=TIMEOUT) as client:
        r = client.get(f"{target.url}/echo")
    assert r.status_code == 403 and r.text == "banned\n"  # the default: the site's last word
    assert broker.proxy_stats(broker.proxies()[0].id)["requests"] == 1  # judged once, not twice
    refusing = make_broker([auth_http_proxy.url])
    transport = PharoxTransport(refusing, raise_on_exhausted=True, max_moves=0)
    with (
        httpx.Client(transport=transport, timeout=TIMEOUT) as client,
        pytest.raises(AllProxiesFailedError) as failed,
    ):
        client.get(f"{target.url}/echo")
    assert [str(a) for a in failed.value.attempts] == [f"{auth_http_proxy.safe_url}: ban (HTTP 403)"]
    assert failed.value.request.url.path == "/echo"
    assert refusing.proxy_stats(refusing.proxies()[0].id)["requests"] == 1


def test_dead_proxy_fails_over_and_goes_inactive(
    make_broker: BrokerFactory, proxy_kit: ProxyKit, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    dead = proxy_kit.dead()
    broker = make_broker([dead.url, auth_http_proxy.url], policy=HealthPolicy(max_failures=2))
    with httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client:
        rs = [client.get(f"{target.url}/echo") for _ in range(6)]
    assert all(r.json()["peer_ip"] == auth_http_proxy.outbound_ip for r in rs)
    failures = [a for r in rs for a in r.extensions["pharox"]["attempts"]]
    assert len(failures) == 2 and all(a.startswith(f"{dead.url}: failure (") for a in failures)
    assert by_host_port(broker, dead).status == ProxyStatus.INACTIVE


@contextmanager
def cut_off_target() -> Iterator[str]:
    """A target that promises 1,000 bytes, sends 10 and hangs up: a body that fails midway."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    finally:
        server.close()
        thread.join(TIMEOUT)


@pytest.mark.parametrize("side", ["sync", "async"])
def test_body_cut_off_midway_is_judged_a_failure_when_the_stream_closes(
    make_broker: BrokerFactory, socks5_proxy: KitProxy, side: str
) -> None:
    broker = make_broker([socks5_proxy.url])
    with cut_off_target() as url:
        if side == "sync":
            with (
                httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client,
                pytest.raises(httpx.RemoteProtocolError),
            ):
                client.get(url)
        else:

            async def fetch() -> None:
                async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=TIMEOUT) as client:
                    await client.get(url)

            with pytest.raises(httpx.RemoteProtocolError):
                asyncio.run(fetch())
    # The 200 came with its headers; the read error decides the verdict, once.
    assert broker.counters["failures"] == 1
    assert broker.proxy_stats(broker.proxies()[0].id)["requests"] == 1
    assert broker.held == 0


@pytest.mark.parametrize("kind", ["http", "socks5"])
@pytest.mark.parametrize("tls", [False, True], ids=["http-target", "https-target"])
def test_wrong_credentials_raise_proxy_authentication_failed(
    make_broker: BrokerFactory,
    auth_http_proxy: KitProxy,
    socks5_proxy: KitProxy,
    target: TargetServer,
    tls_target: TargetServer,
    kind: str,
    tls: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = auth_http_proxy if kind == "http" else socks5_proxy
    wrong = proxy.url.replace("rd%20%25%2B%20x@", "rd%20%25%2B%20WRONG@")
    assert wrong != proxy.url
    broker = make_broker([wrong], acquire_timeout=0.2)
    site = tls_target if tls else target
    with (
        httpx.Client(transport=PharoxTransport(broker, verify=ctx(tls_target)), timeout=TIMEOUT) as client,
        pytest.raises(ProxyAuthenticationFailedError) as refused,
    ):
        client.get(f"{site.url}/echo")
    error = refused.value
    assert isinstance(error, AllProxiesFailedError) and isinstance(error, httpx.HTTPError)
    # One proxy only, tried once: the message names it once.
    assert [(a.proxy, a.outcome) for a in error.attempts] == [(proxy.safe_url, "failure")]
    assert str(error).count(proxy.safe_url) == 1 and "\n" not in str(error)
    assert not site.requests  # never reached the target
    assert_no_secret(str(error), repr(error), caplog.text)
    assert "WRONG" not in str(error) + repr(error) + caplog.text


def test_socks4_only_pool_says_httpx_cannot_speak_it(
    make_broker: BrokerFactory, socks4_proxy: KitProxy, target: TargetServer
) -> None:
    broker = make_broker([socks4_proxy.url], acquire_timeout=0.1)
    with (
        httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client,
        pytest.raises(NoProxyAvailableError, match=r"cannot speak \(socks4"),
    ):
        client.get(f"{target.url}/echo")


def test_invalid_proxy_url_is_rejected_when_added(make_broker: BrokerFactory, auth_http_proxy: KitProxy) -> None:
    broker = make_broker([auth_http_proxy.url])
    with pytest.raises(InvalidProxyURL) as bad:
        broker.add_proxies(["ftp://user:hunter2@127.0.0.1:21"])
    assert isinstance(bad.value, ValueError) and "hunter2" not in str(bad.value)


def test_unknown_extension_keys_and_reserved_kwargs_are_errors(
    make_broker: BrokerFactory, auth_http_proxy: KitProxy, target: TargetServer
) -> None:
    broker = make_broker([auth_http_proxy.url])
    with pytest.raises(TypeError, match="proxy="):
        PharoxTransport(broker, proxy="http://127.0.0.1:1")
    with (
        httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client,
        pytest.raises(httpx.TransportError, match="sesion"),
    ):
        client.get(f"{target.url}/echo", extensions={"pharox": {"sesion": "a"}})


# ---------------------------------------------------------------------- per request options, pool management


def test_sticky_session_and_pool_per_request(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker([p.url for p in proxy_trio[:2]])
    broker.add_proxies([proxy_trio[2].url], pool="other")
    with httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client:
        sticky = {
            client.get(f"{target.url}/echo", extensions={"pharox": {"session": "acct-1"}}).json()["peer_ip"]
            for _ in range(4)
        }
        other = client.get(f"{target.url}/echo", extensions={"pharox": {"pool": "other"}}).json()["peer_ip"]
    assert len(sticky) == 1
    assert other == proxy_trio[2].outbound_ip
    assert_all_returned(broker)


@pytest.mark.asyncio
async def test_pool_management_at_runtime(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    a, b, c = proxy_trio
    # One site's ban benches a proxy everywhere here, so `purge` has a banned one to remove.
    broker = make_broker([a.url], acquire_timeout=0.3, site_bans_to_bench=1)
    async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=TIMEOUT) as client:

        async def seen(n: int) -> set[str]:
            return {(await client.get(f"{target.url}/echo")).json()["peer_ip"] for _ in range(n)}

        assert await seen(3) == {a.outbound_ip}
        broker.add_proxies([b.url, c.url])
        assert await seen(6) == {a.outbound_ip, b.outbound_ip, c.outbound_ip}
        assert broker.remove_proxy(b.url)  # by URL
        assert broker.remove_proxy(next(p.id for p in broker.proxies() if p.port == c.port))  # by id
        assert await seen(3) == {a.outbound_ip}
        broker.add_proxies([b.url])
        target.ban(a.outbound_ip)
        assert await seen(4) == {b.outbound_ip}
        health = broker.health()
        assert (health.total, health.active, health.banned, health.leased) == (2, 1, 1, 0)
        assert health.success_rate is not None and 0 < health.success_rate < 1
        assert health.median_latency_ms is not None and health.median_latency_ms > 0
        assert broker.purge() == 1  # the banned one
        assert [p.port for p in broker.proxies()] == [b.port]
        assert await seen(2) == {b.outbound_ip}


def test_threads_with_a_banned_and_a_dead_proxy_lose_no_lease(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], proxy_kit: ProxyKit, target: TargetServer
) -> None:
    dead = proxy_kit.dead()
    # Short waits: /drop looks like a proxy failure, so proxies get benched and some
    # requests find the pool empty; what matters is that none of them loses a lease.
    broker = make_broker([*(p.url for p in proxy_trio), dead.url], acquire_timeout=0.3)
    target.ban(proxy_trio[0].outbound_ip)
    outcomes: list[str] = []
    lock = threading.Lock()
    transport = PharoxTransport(broker, max_proxy_transports=2)

    def worker(seed: int) -> None:
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            for i in range(20):
                path = ("/echo", "/status/500", "/drop", "/bytes?n=50000&chunk=500")[(seed + i) % 4]
                try:
                    if path.startswith("/bytes"):
                        with client.stream("GET", f"{target.url}{path}") as r:
                            next(r.iter_bytes())  # then close early
                        outcome = "stream"
                    else:
                        outcome = str(client.get(f"{target.url}{path}").status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 160  # every request answered or failed with an httpx error
    assert outcomes.count("200") > 0 and outcomes.count("stream") > 0
    # /drop looks like a proxy failure to the policy: some proxies get benched, some
    # requests fail, always with an httpx error (a ReadError can also come mid-body).
    assert broker.counters["acquired"] == broker.counters["released"]
    transport.close()


def test_proxy_added_by_another_process_is_used(
    proxy_trio: list[KitProxy], target: TargetServer, tmp_path: Any
) -> None:
    from pharox_integrations.storage import storage_from_url

    url = f"sqlite:///{tmp_path / 'pool.db'}"
    storage = storage_from_url(url, create_schema=True)
    broker = LeaseBroker.from_proxies([proxy_trio[0].url], storage=storage, acquire_timeout=2)
    try:
        with httpx.Client(transport=PharoxTransport(broker), timeout=TIMEOUT) as client:
            assert client.get(f"{target.url}/echo").json()["peer_ip"] == proxy_trio[0].outbound_ip
            # Another process seeds the same storage with a second proxy.
            code = (
                "import sys; from pharox_integrations import LeaseBroker; "
                "LeaseBroker.from_proxies([sys.argv[2]], storage=sys.argv[1]).close()"
            )
            subprocess.run([sys.executable, "-c", code, url, proxy_trio[1].url], check=True, timeout=60)
            seen = {client.get(f"{target.url}/echo").json()["peer_ip"] for _ in range(4)}
        assert seen == {proxy_trio[0].outbound_ip, proxy_trio[1].outbound_ip}
        assert_all_returned(broker)
    finally:
        broker.close()
        storage.close()  # type: ignore[attr-defined]
