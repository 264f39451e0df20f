"""SqlStorage on SQLite, PostgreSQL and MariaDB: pharox's contract plus our own promises."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pharox import (
    HealthCheckResult,
    Lease,
    Proxy,
    ProxyFilters,
    ProxyManager,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
)
from pharox.tests.adapters import StorageContractFixtures, storage_contract_suite

from pharox_integrations.errors import StorageUnavailable
from pharox_integrations.filters import with_protocols
from pharox_integrations.storage.sql import SqlStorage, init_schema

if __package__:
    from .sqlhelpers import backend_params, private_database
else:
    from sqlhelpers import backend_params, private_database


@pytest.fixture(params=backend_params())
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with private_database(request.param, tmp_path) as url:
        init_schema(url)
        yield url


@pytest.fixture
def storage(db_url: str) -> Iterator[SqlStorage]:
    store = SqlStorage(db_url, pool_size=8)
    yield store
    store.close()


def _pool(storage: SqlStorage, name: str = "shop") -> ProxyPool:
    pool = ProxyPool(name=name)
    storage.add_pool(pool)
    return pool


def _proxies(
    storage: SqlStorage, pool: ProxyPool, n: int, *, max_concurrency: int | None = 1, **kw: object
) -> list[Proxy]:
    items = [
        Proxy(
            host=f"127.0.0.{i + 1}",
            port=3128,
            protocol=ProxyProtocol.HTTP,
            pool_id=pool.id,
            status=ProxyStatus.ACTIVE,
            max_concurrency=max_concurrency,
            **kw,  # type: ignore[arg-type]
        )
        for i in range(n)
    ]
    storage.add_proxies_bulk(items)
    return items


def test_contract_suite(db_url: str) -> None:
    engine_store = SqlStorage(db_url, pool_size=4)

    def seed_pool(s: object, pool: ProxyPool) -> ProxyPool:
        assert isinstance(s, SqlStorage)
        s.add_pool(pool)
        return pool

    def seed_proxy(s: object, proxy: Proxy) -> Proxy:
        assert isinstance(s, SqlStorage)
        s.add_proxy(proxy)
        return proxy

    try:
        storage_contract_suite(
            StorageContractFixtures(
                # A fresh object (fresh caches, fresh cleanup clock) on the same engine.
                make_storage=lambda: SqlStorage(engine_store.engine),
                seed_pool=seed_pool,  # type: ignore[arg-type]
                seed_proxy=seed_proxy,  # type: ignore[arg-type]
            )
        )
    finally:
        engine_store.close()


def test_init_schema_is_idempotent(db_url: str) -> None:
    init_schema(db_url)  # second run: already at head, nothing to do
    engine = sa.create_engine(db_url)
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"pxi_pools", "pxi_proxies", "pxi_leases", "pxi_health", "pxi_alembic_version"} <= names


def test_create_lease_never_over_leases(storage: SqlStorage) -> None:
    pool = _pool(storage)
    (proxy,) = _proxies(storage, pool, 1, max_concurrency=2)
    storage.create_lease(proxy, "c", 60)
    storage.create_lease(proxy, "c", 60)
    with pytest.raises(ProxyUnavailableError):
        storage.create_lease(proxy, "c", 60)
    assert storage.get_proxy(str(proxy.id)).current_leases == 2


def test_release_is_idempotent_and_after_expiry_a_no_op(storage: SqlStorage) -> None:
    pool = _pool(storage)
    (proxy,) = _proxies(storage, pool, 1, max_concurrency=3)
    a = storage.create_lease(proxy, "c", 60)
    b = storage.create_lease(proxy, "c", 1)
    storage.release_lease(a)
    storage.release_lease(a)
    assert storage.get_proxy(str(proxy.id)).current_leases == 1
    time.sleep(1.1)
    assert storage.cleanup_expired_leases(force=True) == 1
    storage.release_lease(b)  # the holder comes back late: must not decrement again
    assert storage.get_proxy(str(proxy.id)).current_leases == 0
    stored = storage.get_lease(str(b.id))
    assert stored is not None and stored.status.value == "released"


def test_cleanup_is_rate_limited(db_url: str) -> None:
    store = SqlStorage(db_url, cleanup_interval=30)
    try:
        pool = _pool(store)
        (proxy,) = _proxies(store, pool, 1)
        assert store.cleanup_expired_leases() == 0  # runs, starts the interval
        store.create_lease(proxy, "c", 1)
        time.sleep(1.1)
        assert store.cleanup_expired_leases() == 0  # within the interval: skipped
        assert store.cleanup_expired_leases(force=True) == 1
    finally:
        store.close()


def test_acquire_lease_one_transaction(storage: SqlStorage) -> None:
    pool = _pool(storage)
    items = _proxies(storage, pool, 3)
    got = [
        storage.acquire_lease("shop", "c", 60, selector=SelectorStrategy.ROUND_ROBIN)
        for _ in range(4)
    ]
    leases = [g for g in got if g is not None]
    assert len(leases) == 3 and got[3] is None
    assert sorted(lease.proxy_id for lease in leases) == sorted(p.id for p in items)
    assert all(lease.pool_name == "shop" for lease in leases)
    assert storage.count_active_leases("shop") == 3


def test_round_robin_is_shared_between_storage_objects(db_url: str) -> None:
    a, b = SqlStorage(db_url), SqlStorage(db_url)
    try:
        pool = _pool(a)
        items = _proxies(a, pool, 4, max_concurrency=None)
        seen = []
        for i in range(8):
            store = a if i % 2 == 0 else b  # alternate "processes"
            lease = store.acquire_lease("shop", "c", 60, selector=SelectorStrategy.ROUND_ROBIN)
            assert lease is not None
            seen.append(lease.proxy_id)
        order = sorted(p.id for p in items)
        assert seen == order + order
    finally:
        a.close()
        b.close()


def test_filters_sql_and_python(storage: SqlStorage) -> None:
    pool = _pool(storage)
    http, socks = (
        Proxy(host="127.0.0.1", port=1, protocol=ProxyProtocol.HTTP, pool_id=pool.id,
              status=ProxyStatus.ACTIVE, country="AR"),
        Proxy(host="127.0.0.2", port=2, protocol=ProxyProtocol.SOCKS5, pool_id=pool.id,
              status=ProxyStatus.ACTIVE, country="AR"),
    )
    storage.add_proxies_bulk([http, socks])
    only_socks = with_protocols(ProxyFilters(country="AR"), ["socks5"])
    found = storage.find_available_proxy("shop", only_socks)
    assert found is not None and found.id == socks.id
    assert storage.find_available_proxy("shop", with_protocols(None, ["https"])) is None
    predicate = ProxyFilters(
        none_of=[ProxyFilters(predicate=lambda p: p.port == 1)],
        any_of=[ProxyFilters(country="AR"), ProxyFilters(country="CL")],
    )
    found = storage.find_available_proxy("shop", predicate)
    assert found is not None and found.id == socks.id



def test_acquire_lease_with_protocols_the_common_door_filter(storage: SqlStorage) -> None:
    """Every door leases with a protocol filter: the cached one-statement form must
    honour it (PostgreSQL runs it on psycopg directly), for each protocol set."""
    pool = _pool(storage)
    http, socks = (
        Proxy(host="127.0.0.1", port=1, protocol=ProxyProtocol.HTTP, pool_id=pool.id,
              status=ProxyStatus.ACTIVE, max_concurrency=1),
        Proxy(host="127.0.0.2", port=2, protocol=ProxyProtocol.SOCKS5, pool_id=pool.id,
              status=ProxyStatus.ACTIVE, max_concurrency=1),
    )
    storage.add_proxies_bulk([http, socks])
    rr = SelectorStrategy.ROUND_ROBIN
    web = with_protocols(None, ["http", "https"])
    lease = storage.acquire_lease("shop", "c", 60, web, rr)
    assert lease is not None and lease.proxy_id == http.id
    assert storage.acquire_lease("shop", "c", 60, web, rr) is None  # the socks5 one never
    socks_lease = storage.acquire_lease("shop", "c", 60, with_protocols(None, ["socks5"]), rr)
    assert socks_lease is not None and socks_lease.proxy_id == socks.id
    storage.release_lease(lease)
    again = storage.acquire_lease("shop", "c", 60, web, rr)
    assert again is not None and again.proxy_id == http.id
    for held in (again, socks_lease):
        storage.release_lease(held)
    assert storage.count_active_leases("shop") == 0

def test_pool_stats_cached_but_exact_for_own_leases(storage: SqlStorage) -> None:
    pool = _pool(storage)
    items = _proxies(storage, pool, 3)
    first = storage.get_pool_stats("shop")
    assert first is not None and first.available_proxies == 3
    lease = storage.create_lease(items[0], "c", 60)
    stats = storage.get_pool_stats("shop")
    assert stats is not None
    assert (stats.available_proxies, stats.leased_proxies, stats.total_leases) == (2, 1, 1)
    storage.release_lease(lease)
    stats = storage.get_pool_stats("shop")
    assert stats is not None
    assert (stats.available_proxies, stats.leased_proxies, stats.total_leases) == (3, 0, 0)
    assert storage.get_pool_stats("nope") is None


def test_health_history_is_bounded(db_url: str) -> None:
    store = SqlStorage(db_url, health_history=5)
    try:
        pool = _pool(store)
        (proxy,) = _proxies(store, pool, 1)
        for i in range(12):
            status = ProxyStatus.BANNED if i == 11 else ProxyStatus.ACTIVE
            store.apply_health_check_result(
                HealthCheckResult(proxy_id=proxy.id, status=status, latency_ms=10 + i,
                                  protocol=ProxyProtocol.HTTP, status_code=403 if i == 11 else 200)
            )
        records = store.list_health_records(proxy.id)
        assert [r.latency_ms for r in records] == [21, 20, 19, 18, 17]
        last = store.get_last_health_result(proxy.id)
        assert last is not None and last.status == ProxyStatus.BANNED and last.status_code == 403
        assert [p.id for p in store.list_proxies_by_status("shop", ["banned"])] == [proxy.id]
        assert store.find_available_proxy("shop") is None
        with store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM pxi_health")).scalar_one()
        assert rows == 5
    finally:
        store.close()



def test_more_threads_than_connections_wait_their_turn(db_url: str) -> None:
    """pool_size=1 (2 connections with overflow) under 8 threads: everyone is served
    in turn (PostgreSQL's direct path has its own bounded pool), nothing leaks."""
    store = SqlStorage(db_url, pool_size=1)
    try:
        pool = _pool(store)
        _proxies(store, pool, 8, max_concurrency=None)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    lease = store.acquire_lease("shop", "w", 30, selector=SelectorStrategy.ROUND_ROBIN)
                    assert lease is not None
                    store.release_lease(lease)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert store.count_active_leases("shop") == 0
    finally:
        store.close()


def test_cursor_event_listeners_see_the_hot_path(storage: SqlStorage) -> None:
    """Tracing hooks on the engine see every lease statement (PostgreSQL then leaves
    its direct psycopg path for SQLAlchemy's), and leasing works either way."""
    pool = _pool(storage)
    (proxy,) = _proxies(storage, pool, 1)
    rr = SelectorStrategy.ROUND_ROBIN
    seen: list[str] = []

    def listener(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    for watched in (False, True, False):
        if watched:
            sa.event.listen(storage.engine, "before_cursor_execute", listener)
        try:
            lease = storage.acquire_lease("shop", "c", 60, selector=rr)
            assert lease is not None and lease.proxy_id == proxy.id
            storage.apply_health_check_result(
                HealthCheckResult(proxy_id=proxy.id, status=ProxyStatus.ACTIVE, latency_ms=5,
                                  protocol=ProxyProtocol.HTTP, status_code=200)
            )
            storage.release_lease(lease)
        finally:
            if watched:
                sa.event.remove(storage.engine, "before_cursor_execute", listener)
        if watched:
            assert any("pxi_leases" in s for s in seen) and any("pxi_health" in s for s in seen)
            count = len(seen)
    assert len(seen) == count  # nothing reported once the listener is gone
    assert storage.count_active_leases("shop") == 0

def test_manager_threads_never_over_lease(storage: SqlStorage) -> None:
    """8 threads through pharox.ProxyManager on 3 single-slot proxies: no overlap."""
    pool = _pool(storage)
    _proxies(storage, pool, 3)
    manager = ProxyManager(storage)
    held: dict[object, int] = {}
    lock = threading.Lock()
    overlaps: list[object] = []
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(15):
            try:
                lease: Lease | None = manager.acquire_proxy(
                    "shop", "w", 30, selector=SelectorStrategy.ROUND_ROBIN
                )
            except ProxyUnavailableError:
                continue  # lost the race between find and create: the core retries
            except BaseException as exc:
                errors.append(exc)
                return
            if lease is None:
                time.sleep(0.002)
                continue
            with lock:
                if held.get(lease.proxy_id):
                    overlaps.append(lease.proxy_id)
                held[lease.proxy_id] = 1
            time.sleep(0.001)
            with lock:
                held[lease.proxy_id] = 0
            manager.release_proxy(lease)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not overlaps
    assert storage.count_active_leases("shop") == 0
    assert all(p.current_leases == 0 for p in storage.list_proxies(str(pool.id)))


def test_unreachable_database_raises_one_clear_error(tmp_path: Path) -> None:
    store = SqlStorage("postgresql+psycopg://pxuser:s3cret-pw@127.0.0.1:9/nodb", pool_size=1)
    try:
        with pytest.raises(StorageUnavailable) as info:
            store.get_pool_stats("shop")
    finally:
        store.close()
    message = str(info.value)
    assert "127.0.0.1:9" in message and "s3cret-pw" not in message
    assert "s3cret-pw" not in repr(store)


def test_purge_released_leases(storage: SqlStorage) -> None:
    pool = _pool(storage)
    (proxy,) = _proxies(storage, pool, 1)
    lease = storage.create_lease(proxy, "c", 60)
    storage.release_lease(lease)
    assert storage.purge_released_leases(older_than=timedelta(seconds=0)) == 0  # not expired yet
    assert storage.purge_released_leases(older_than=timedelta(seconds=-120)) == 1
    assert storage.get_lease(str(lease.id)) is None


def test_sqlite_rejects_memory_url() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        SqlStorage("sqlite://")


def test_create_schema_flag_and_lowest_latency(tmp_path: Path) -> None:
    store = SqlStorage(f"sqlite:///{tmp_path / 'fresh.db'}", create_schema=True)
    try:
        pool = _pool(store)
        slow, fast = _proxies(store, pool, 2, max_concurrency=None)
        # Never checked, and first by id: "no latency known" must sort last, not first.
        store.add_proxy(
            Proxy(
                id=uuid.UUID(int=1),
                host="127.0.0.9",
                port=3128,
                protocol=ProxyProtocol.HTTP,
                pool_id=pool.id,
                status=ProxyStatus.ACTIVE,
            )
        )
        for proxy, latency in ((slow, 900), (fast, 40)):
            store.apply_health_check_result(
                HealthCheckResult(
                    proxy_id=proxy.id,
                    status=ProxyStatus.ACTIVE,
                    latency_ms=latency,
                    protocol=ProxyProtocol.HTTP,
                )
            )
        found = store.find_available_proxy("shop", selector=SelectorStrategy.LOWEST_LATENCY)
        assert found is not None and found.id == fast.id
        lease = store.acquire_lease("shop", "c", 60, selector=SelectorStrategy.LEAST_USED)
        assert lease is not None
    finally:
        store.close()
