"""Shared fixtures: real target servers and real proxies on loopback.

See tests/servers/README.md for the fixture API.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

if not __package__:  # pytest's default rootdir import: tests/ is on sys.path
    from servers import (
        SPECIAL_AUTH,
        KitProxy,
        ProxyKit,
        ProxyStartError,
        TargetServer,
        make_tls_target,
    )
else:  # tests/ became a package
    from .servers import (  # type: ignore[import-not-found,no-redef]
        SPECIAL_AUTH,
        KitProxy,
        ProxyKit,
        ProxyStartError,
        TargetServer,
        make_tls_target,
    )

_PROXY_ENV_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's HTTP(S)_PROXY must never route test traffic (any case)."""
    for name in list(os.environ):
        if name.lower() in _PROXY_ENV_VARS:
            monkeypatch.delenv(name)


# -- targets ---------------------------------------------------------------
@pytest.fixture(scope="session")
def _target_server() -> Iterator[TargetServer]:
    server = TargetServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def _tls_target_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TargetServer]:
    server = make_tls_target(str(tmp_path_factory.mktemp("kit-ca")))
    yield server
    server.close()


@pytest.fixture
def target(_target_server: TargetServer) -> TargetServer:
    """HTTP target, shared by the session, with bans/hits/requests cleared per test."""
    _target_server.reset()
    return _target_server


@pytest.fixture
def tls_target(_tls_target_server: TargetServer) -> TargetServer:
    """HTTPS target (cert for 127.0.0.1 and localhost); CA PEM at ``.ca_bundle``."""
    _tls_target_server.reset()
    return _tls_target_server


# -- proxies ---------------------------------------------------------------
@pytest.fixture
def proxy_kit(tmp_path: Path) -> Iterator[ProxyKit]:
    """Factory: ``.http(auth=, outbound_ip=)``, ``.socks5(auth=, ...)``, ``.socks4()``,
    ``.dead()``, ``.many(kind, auths)``; all stopped at the end of the test."""
    kit = ProxyKit(tmp_path / "proxies")
    yield kit
    kit.close()


@pytest.fixture(scope="session")
def _shared_kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyKit]:
    kit = ProxyKit(tmp_path_factory.mktemp("shared-proxies"))
    yield kit
    kit.close()


@pytest.fixture(scope="session")
def _shared_trio(_shared_kit: ProxyKit) -> list[KitProxy]:
    auths = [(f"{SPECIAL_AUTH[0]}{i}", f"{SPECIAL_AUTH[1]}{i}") for i in (1, 2, 3)]
    return _shared_kit.many("http", auths)


@pytest.fixture(scope="session")
def _shared_singles() -> dict[str, KitProxy]:
    return {}


def _shared_single(kit: ProxyKit, cache: dict[str, KitProxy], key: str) -> KitProxy:
    proxy = cache.get(key)
    if proxy is None:
        if key == "http":
            proxy = kit.http()
        elif key == "auth_http":
            proxy = kit.http(auth=SPECIAL_AUTH)
        elif key == "socks5":
            proxy = kit.socks5(auth=SPECIAL_AUTH)
        else:
            proxy = kit.socks4()
        cache[key] = proxy
    return _ensure_alive(proxy)


def _ensure_alive(proxy: KitProxy) -> KitProxy:
    """Undo a previous test's stop()/kill(): same port if still free, else a new one."""
    if proxy.alive:
        return proxy
    try:
        return proxy.restart()
    except ProxyStartError:
        return proxy.start()


@pytest.fixture
def proxy_trio(_shared_trio: list[KitProxy]) -> list[KitProxy]:
    """Three proxy.py HTTP proxies, each with its own credentials (special
    characters) and outbound IP. Shared by the session; a member a test stopped
    or killed is restarted (same port if free) before the next test."""
    return [_ensure_alive(p) for p in _shared_trio]


@pytest.fixture
def http_proxy(_shared_kit: ProxyKit, _shared_singles: dict[str, KitProxy]) -> KitProxy:
    """Shared proxy.py HTTP proxy without auth."""
    return _shared_single(_shared_kit, _shared_singles, "http")


@pytest.fixture
def auth_http_proxy(_shared_kit: ProxyKit, _shared_singles: dict[str, KitProxy]) -> KitProxy:
    """Shared proxy.py HTTP proxy with ``SPECIAL_AUTH`` credentials."""
    return _shared_single(_shared_kit, _shared_singles, "auth_http")


@pytest.fixture
def socks5_proxy(_shared_kit: ProxyKit, _shared_singles: dict[str, KitProxy]) -> KitProxy:
    """Shared pproxy SOCKS5 proxy with ``SPECIAL_AUTH`` credentials."""
    return _shared_single(_shared_kit, _shared_singles, "socks5")


@pytest.fixture
def socks4_proxy(_shared_kit: ProxyKit, _shared_singles: dict[str, KitProxy]) -> KitProxy:
    """Shared pproxy SOCKS4 proxy (no auth)."""
    return _shared_single(_shared_kit, _shared_singles, "socks4")


# -- two sites ----------------------------------------------------------------
@pytest.fixture(scope="module")
def _two_sites() -> Iterator[tuple[TargetServer, TargetServer]]:
    a, b = TargetServer(host="127.0.0.8"), TargetServer(host="127.0.0.9")
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def sites(_two_sites: tuple[TargetServer, TargetServer]) -> tuple[TargetServer, TargetServer]:
    """Two HTTP sites on their own loopback addresses (an address is its own site),
    bans/hits/requests cleared per test."""
    for site in _two_sites:
        site.reset()
    return _two_sites
