"""The httpx door meets the contract every door meets (real proxies, real targets).

Every proxy bans: the caller gets the last ban.  Every proxy fails: one error naming
each proxy once.  A body that cannot be replayed is sent once.  A cancelled async
request, wherever it stands, leaves nothing leased.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pharox_integrations import HealthPolicy, LeaseBroker, ProxyAuthenticationFailed, ReportFailed
from pharox_integrations.httpx import (
    AllProxiesFailedError,
    AsyncPharoxTransport,
    PharoxTransport,
    ProxyAuthenticationFailedError,
)
from pharox_integrations.storage import storage_from_url

if not __package__:
    from brokerhelpers import give_back_kept_slots
    from servers import KitProxy, ProxyKit, TargetServer
else:  # tests/ became a package
    from .brokerhelpers import give_back_kept_slots  # type: ignore[import-not-found,no-redef]
    from .servers import KitProxy, ProxyKit, TargetServer  # type: ignore[import-not-found,no-redef]

TIMEOUT = 10
SIDES = ["sync", "async"]

BrokerFactory = Callable[..., LeaseBroker]


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Brokers over the given proxy URLs (`storage="sqlite"`: a blocking SQL storage);
    every lease must be back at the end of the test."""
    made: list[LeaseBroker] = []

    def make(urls: list[str], *, storage: str = "memory", **kwargs: Any) -> LeaseBroker:
        kwargs.setdefault("acquire_timeout", 2.0)
        if storage == "sqlite":
            kwargs["storage"] = storage_from_url(f"sqlite:///{tmp_path / f'pool{len(made)}.db'}", create_schema=True)
        broker = LeaseBroker.from_proxies(urls, **kwargs)
        made.append(broker)
        return broker

    yield make
    try:
        for broker in made:
            assert broker.held == 0, broker.held_leases()
            assert broker.counters["acquired"] == broker.counters["released"]
            give_back_kept_slots(broker)  # a lease block's free slots are not leases in use
            assert not [p.port for p in broker.proxies() if p.current_leases]
    finally:
        for broker in made:
            broker.close()
            close = getattr(broker.storage, "close", None)
            if close is not None:
                close()


def send(side: str, broker: LeaseBroker, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request through the sync or the async transport (its body read, its lease back)."""
    options = {k: kwargs.pop(k) for k in ("max_moves", "verify") if k in kwargs}
    if side == "sync":
        with httpx.Client(transport=PharoxTransport(broker, **options), timeout=TIMEOUT) as client:
            return client.request(method, url, **kwargs)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker, **options), timeout=TIMEOUT) as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(run())


def stats(broker: LeaseBroker, proxy: Any) -> dict[str, Any]:
    return broker.proxy_stats(next(p.id for p in broker.proxies() if p.port == proxy.port))


# ---------------------------------------------------------------------- every proxy bans


@pytest.mark.parametrize("side", SIDES)
def test_every_proxy_banning_returns_the_last_ban(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer, side: str
) -> None:
    broker = make_broker([p.url for p in proxy_trio])
    for p in proxy_trio:
        target.ban(p.outbound_ip)
    r = send(side, broker, "GET", f"{target.url}/echo")
    assert r.status_code == 403 and r.text == "banned\n"
    assert {ip: target.hits[ip] for ip in target.hits} == {p.outbound_ip: 1 for p in proxy_trio}  # each once
    assert sorted(r.extensions["pharox"]["attempts"]) == sorted(f"{p.safe_url}: ban (HTTP 403)" for p in proxy_trio)
    assert broker.counters["bans"] == 3 and broker.health().banned == 0  # the site's verdict only
    assert broker.health(site=target.url).site_banned == 3
    assert all(stats(broker, p)["requests"] == 1 for p in proxy_trio)  # judged once each


# ---------------------------------------------------------------------- every proxy fails


@pytest.mark.parametrize("side", SIDES)
def test_dead_proxies_are_each_named_once(
    make_broker: BrokerFactory, proxy_kit: ProxyKit, target: TargetServer, side: str
) -> None:
    dead = [proxy_kit.dead(), proxy_kit.dead()]
    broker = make_broker([d.url for d in dead], acquire_timeout=0.5)
    with pytest.raises(AllProxiesFailedError) as failed:
        send(side, broker, "GET", f"{target.url}/echo")
    error = failed.value
    assert isinstance(error, httpx.ProxyError) and error.request.url.path == "/echo"
    assert sorted(a.proxy for a in error.attempts) == sorted(d.url for d in dead)
    message = str(error)
    assert all(message.count(d.url) == 1 for d in dead), message
    assert "\n" not in message and " object at 0x" not in message
    assert all(a.outcome == "failure" for a in error.attempts)
    assert all(stats(broker, d)["failures"] == 1 for d in dead)
    assert not target.requests


@pytest.mark.parametrize("side", SIDES)
def test_a_refused_proxy_login_moves_then_fails_as_authentication(
    make_broker: BrokerFactory,
    auth_http_proxy: KitProxy,
    socks5_proxy: KitProxy,
    http_proxy: KitProxy,
    target: TargetServer,
    tls_target: TargetServer,
    side: str,
) -> None:
    """407 to a plain request, 407 to CONNECT, SOCKS5 refusing the password: the proxy's
    failure, never the site's answer."""
    wrong = [p.url.replace("rd%20%25%2B%20x@", "rd%20%25%2B%20WRONG@") for p in (auth_http_proxy, socks5_proxy)]
    broker = make_broker([*wrong, http_proxy.url], policy=HealthPolicy(max_failures=20))
    verify = ssl.create_default_context(cafile=tls_target.ca_bundle)
    for site in (target, tls_target):
        for _ in range(3):  # whichever proxy comes first, the request ends on the good one
            r = send(side, broker, "GET", f"{site.url}/echo", max_moves=2, verify=verify)
            assert r.status_code == 200 and r.json()["peer_ip"] == http_proxy.outbound_ip
            assert all(a.endswith(")") and ": failure (" in a for a in r.extensions["pharox"]["attempts"])
    assert all(stats(broker, p)["failures"] >= 1 for p in (auth_http_proxy, socks5_proxy))  # the proxy's fault
    broker.remove_proxy(http_proxy.url)
    with pytest.raises(ProxyAuthenticationFailedError) as refused:
        send(side, broker, "GET", f"{tls_target.url}/echo", verify=verify)
    assert isinstance(refused.value, ProxyAuthenticationFailed) and isinstance(refused.value, httpx.ProxyError)
    assert sorted(a.proxy for a in refused.value.attempts) == sorted([auth_http_proxy.safe_url, socks5_proxy.safe_url])
    assert "WRONG" not in str(refused.value)


# ---------------------------------------------------------------------- bodies


@pytest.mark.parametrize("side", SIDES)
def test_a_streamed_body_is_never_sent_twice(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer, side: str
) -> None:
    broker = make_broker([p.url for p in proxy_trio])
    for p in proxy_trio:
        target.ban(p.outbound_ip)
    sent: list[int] = []

    def body() -> Iterator[bytes]:
        sent.append(1)
        yield b"once"

    async def abody() -> AsyncIterator[bytes]:
        sent.append(1)
        yield b"once"

    r = send(side, broker, "POST", f"{target.url}/echo", content=body() if side == "sync" else abody())
    assert r.status_code == 403  # banned, and no move: the site's answer as it is
    assert sent == [1] and [q.body for q in target.requests] == [b"once"]
    assert len(r.extensions["pharox"]["attempts"]) == 1
    # A bytes body replays: it moves through the two proxies left.
    target.reset()
    for p in proxy_trio:
        target.ban(p.outbound_ip)
    r = send(side, broker, "POST", f"{target.url}/echo", content=b"twice")
    assert r.status_code == 403 and [q.body for q in target.requests] == [b"twice", b"twice"]


# ---------------------------------------------------------------------- the old keyword


def test_proxy_retries_still_works_with_a_deprecation_warning(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    broker = make_broker([p.url for p in proxy_trio])
    for p in proxy_trio:
        target.ban(p.outbound_ip)
    with pytest.warns(DeprecationWarning, match="proxy_retries= is deprecated: use max_moves=") as warned:
        transport = PharoxTransport(broker, proxy_retries=1)
    assert warned[0].filename == __file__  # points at the caller's line
    assert transport.max_moves == 1
    with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
        assert client.get(f"{target.url}/echo").status_code == 403
    assert sum(target.hits.values()) == 2  # the first proxy and one move
    with pytest.raises(ValueError, match="both given"):
        AsyncPharoxTransport(broker, proxy_retries=1, max_moves=1)
    with pytest.raises(ValueError, match="max_moves=-1"):
        PharoxTransport(broker, max_moves=-1)


# ---------------------------------------------------------------------- cancellation


async def _cancel_after(coro: Any, seconds: float) -> None:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(seconds)
    assert not task.done(), "the request ended before it could be cancelled"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
@pytest.mark.parametrize("storage", ["memory", "sqlite"])
async def test_a_request_cancelled_while_waiting_for_a_lease_holds_nothing(
    make_broker: BrokerFactory, http_proxy: KitProxy, target: TargetServer, storage: str
) -> None:
    broker = make_broker([http_proxy.url], storage=storage, max_concurrency=1, acquire_timeout=5)
    busy = broker.acquire()  # the only proxy is at capacity: the request waits
    async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=TIMEOUT) as client:
        await _cancel_after(client.get(f"{target.url}/echo"), 0.3)
        assert broker.held == 1  # only ours
        broker.release(busy)
        assert broker.held == 0
        assert (await client.get(f"{target.url}/echo")).status_code == 200  # nothing left behind
    assert broker.held == 0 and stats(broker, http_proxy)["failures"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("storage", ["memory", "sqlite"])
async def test_a_request_cancelled_while_sending_holds_nothing(
    make_broker: BrokerFactory, http_proxy: KitProxy, target: TargetServer, storage: str
) -> None:
    broker = make_broker([http_proxy.url], storage=storage)
    async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=TIMEOUT) as client:
        await _cancel_after(client.get(f"{target.url}/slow?ms=3000"), 0.5)
        assert broker.held == 0
        assert (await client.get(f"{target.url}/echo")).status_code == 200
    # Cancelled is not the proxy's fault: nothing counted against it.
    assert stats(broker, http_proxy)["failures"] == 0 and broker.counters["released"] == 2


@pytest.mark.asyncio
async def test_a_request_cancelled_while_its_move_waits_for_a_lease_holds_nothing(
    make_broker: BrokerFactory, proxy_trio: list[KitProxy], target: TargetServer
) -> None:
    """The first proxy is banned; the move waits (in a worker thread) for the other
    proxy, at capacity; the caller gives up meanwhile.  The lease the move obtains
    after that is given back too."""
    banned, other = proxy_trio[:2]
    target.ban(banned.outbound_ip)
    broker = make_broker([banned.url, other.url], max_concurrency=1, acquire_timeout=5)
    both = [broker.acquire(), broker.acquire()]
    busy = next(lease for lease in both if lease.port == other.port)
    broker.release(next(lease for lease in both if lease is not busy))
    async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=TIMEOUT) as client:
        await _cancel_after(client.get(f"{target.url}/echo"), 0.5)
        assert target.hits[banned.outbound_ip] == 1
        assert broker.held == 1  # ours: the banned proxy's lease went back at the cancellation
        leased = broker.counters["acquired"]
        broker.release(busy)  # the waiting move gets it now, and must give it back
        deadline = time.monotonic() + 5
        while (broker.counters["acquired"] == leased or broker.held) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert broker.counters["acquired"] == leased + 1, "the move never got its lease"
        assert broker.held == 0, broker.held_leases()
    assert stats(broker, banned)["bans"] == 1


# ---------------------------------------------------------------------- reports


@pytest.mark.parametrize("side", SIDES)
def test_a_failing_ban_detector_is_a_report_failure_and_releases(
    proxy_trio: list[KitProxy], target: TargetServer, side: str
) -> None:
    def detector(status_code: int | None, response: Any) -> bool | None:
        raise RuntimeError("detector bug")

    broker = LeaseBroker.from_proxies([proxy_trio[0].url], policy=HealthPolicy(ban_detector=detector))
    try:
        with pytest.raises(ReportFailed, match="detector bug") as failed:
            send(side, broker, "GET", f"{target.url}/echo")
        assert isinstance(failed.value, httpx.TransportError)
        assert broker.held == 0 and broker.counters["acquired"] == broker.counters["released"] == 1
    finally:
        broker.close()
