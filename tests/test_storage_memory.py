"""MemoryStorage: pharox's contract, parity with pharox's InMemoryStorage, and the
index bookkeeping that makes it fast (selectors, filters, expiry, bounded history)."""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from pharox import (
    HealthCheckResult,
    InMemoryStorage,
    InvalidLeaseError,
    IStorage,
    Lease,
    PoolNotFoundError,
    Proxy,
    ProxyCredentials,
    ProxyFilters,
    ProxyHealthRecord,
    ProxyManager,
    ProxyNotFoundError,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
    bootstrap_consumer,
    bootstrap_pool,
    bootstrap_proxy,
)
from pharox.tests.adapters import StorageContractFixtures, storage_contract_suite

from pharox_integrations.filters import ProtocolFilter, with_protocols
from pharox_integrations.storage.memory import MemoryStorage

FIRST = SelectorStrategy.FIRST_AVAILABLE
ROUND_ROBIN = SelectorStrategy.ROUND_ROBIN
LEAST_USED = SelectorStrategy.LEAST_USED
LOWEST_LATENCY = SelectorStrategy.LOWEST_LATENCY


# -- helpers ---------------------------------------------------------------
@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def pool(storage: MemoryStorage) -> ProxyPool:
    return bootstrap_pool(storage, name="main")


_port = iter(range(20000, 60000))


def add(storage: IStorage, pool: ProxyPool, **fields: Any) -> Proxy:
    fields.setdefault("status", ProxyStatus.ACTIVE)
    fields.setdefault("protocol", ProxyProtocol.HTTP)
    proxy = Proxy(host="127.0.0.1", port=next(_port), pool_id=pool.id, **fields)
    storage.add_proxy(proxy)  # type: ignore[attr-defined]
    return proxy


def health(storage: IStorage, proxy: Proxy, status: ProxyStatus, latency_ms: int = 10) -> None:
    storage.apply_health_check_result(
        HealthCheckResult(
            proxy_id=proxy.id, status=status, latency_ms=latency_ms, protocol=proxy.protocol
        )
    )


def lease(storage: IStorage, proxy: Proxy, seconds: int = 60) -> Lease:
    storage.ensure_consumer("c")
    return storage.create_lease(proxy, "c", seconds)


def pick(storage: IStorage, pool: ProxyPool, **kw: Any) -> UUID | None:
    found = storage.find_available_proxy(pool.name, **kw)
    return None if found is None else found.id


def assert_consistent(storage: MemoryStorage, pool: ProxyPool) -> None:
    """The O(1) counters agree with a full recount of the stored proxies."""
    proxies = storage.list_proxies(str(pool.id))
    stats = storage.get_pool_stats(pool.name)
    assert stats is not None
    active = [p for p in proxies if p.status == ProxyStatus.ACTIVE]
    free = [p for p in active if p.max_concurrency is None or p.current_leases < p.max_concurrency]
    assert stats.total_proxies == len(proxies)
    assert stats.active_proxies == len(active)
    assert stats.available_proxies == len(free)
    assert stats.leased_proxies == sum(p.current_leases > 0 for p in proxies)
    assert stats.total_leases == sum(p.current_leases for p in proxies)
    for status in ProxyStatus:
        by_status = storage.list_proxies_by_status(pool.name, [status])
        assert {p.id for p in by_status} == {p.id for p in proxies if p.status == status}


# -- pharox's own contract -------------------------------------------------
def test_pharox_storage_contract_suite() -> None:
    def seed_pool(storage: IStorage, pool: ProxyPool) -> ProxyPool:
        storage.save_pool(pool)
        return storage.get_pool(str(pool.id))

    def seed_proxy(storage: IStorage, proxy: Proxy) -> Proxy:
        storage.save_proxy(proxy)
        return storage.get_proxy(str(proxy.id))

    storage_contract_suite(
        StorageContractFixtures(make_storage=MemoryStorage, seed_pool=seed_pool, seed_proxy=seed_proxy)
    )


def test_bootstrap_helpers_work(storage: MemoryStorage) -> None:
    pool = bootstrap_pool(storage, name="boot")
    consumer = bootstrap_consumer(storage, name="worker")
    proxy = bootstrap_proxy(storage, pool=pool, host="127.0.0.1", port=3128)
    assert storage.ensure_consumer("worker") == consumer.id
    assert storage.get_proxy_by_id(proxy.id) == proxy
    assert storage.get_pool_by_name("boot") == pool


# -- parity with pharox's InMemoryStorage ----------------------------------
def _random_filters(rng: random.Random) -> ProxyFilters | None:
    country = rng.choice(["AR", "BR", "CL", "", None])
    choices: list[Callable[[], ProxyFilters | None]] = [
        lambda: None,
        lambda: ProxyFilters(country=country),
        lambda: ProxyFilters(source=rng.choice(["a", "b"]), isp=rng.choice(["x", "y", "z"])),
        lambda: ProxyFilters(city=rng.choice(["c1", "c2", "c3", "c4"]), asn=rng.choice([1, 2])),
        lambda: ProxyFilters(asn=rng.choice([1, 2, 3])),
        lambda: ProxyFilters(predicate=lambda p: p.port % 3 == 0),
        lambda: ProxyFilters(latitude=10.0, longitude=10.0, radius_km=rng.choice([300.0, 900.0])),
        lambda: ProxyFilters(
            any_of=[ProxyFilters(country="AR"), ProxyFilters(source="b")],
            none_of=[ProxyFilters(isp="x")],
        ),
        lambda: ProxyFilters(all_of=[ProxyFilters(country=country), ProxyFilters(source="a")]),
        lambda: ProxyFilters(all_of=[ProxyFilters(country="AR"), ProxyFilters(country="BR")]),
        lambda: with_protocols(ProxyFilters(country=country), ["socks5"]),
        lambda: with_protocols(
            ProxyFilters(predicate=lambda p: p.port % 2 == 0), ["http", "https"]
        ),
    ]
    return rng.choice(choices)()


def test_same_choices_as_pharox_in_memory_storage() -> None:
    """Random leases, releases and health checks on both storages pick the same
    proxies for every selector whose order pharox defines without a cursor."""
    rng = random.Random(7)
    ours, theirs = MemoryStorage(health_history=4), InMemoryStorage()
    pool = ProxyPool(name="parity")
    for store in (ours, theirs):
        store.add_pool(pool)
        store.ensure_consumer("c")
    proxies = [
        Proxy(
            host="127.0.0.1",
            port=1000 + i,
            pool_id=pool.id,
            status=ProxyStatus.ACTIVE,
            protocol=rng.choice(list(ProxyProtocol)),
            country=rng.choice(["AR", "BR", "CL"]),
            source=rng.choice(["a", "b"]),
            city=rng.choice(["c1", "c2", "c3", "c4"]),
            isp=rng.choice(["x", "y", "z"]),
            asn=rng.choice([1, 2, 3]),
            latitude=rng.uniform(0, 20) if i % 4 else None,
            longitude=rng.uniform(0, 20) if i % 4 else None,
            max_concurrency=rng.choice([1, 2, None]),
        )
        for i in range(300)
    ]
    for store in (ours, theirs):
        store.add_proxies_bulk(proxies)
    held: list[tuple[Lease, Lease]] = []
    for _ in range(1500):
        action = rng.random()
        if action < 0.5:
            selector = rng.choice([FIRST, LEAST_USED, LOWEST_LATENCY])
            filters = _random_filters(rng)
            a = ours.find_available_proxy(pool.name, filters, selector)
            b = theirs.find_available_proxy(pool.name, filters, selector)
            assert (a and a.id) == (b and b.id), (selector, filters)
            if a is not None and b is not None:
                held.append((ours.create_lease(a, "c", 60), theirs.create_lease(b, "c", 60)))
        elif action < 0.8 and held:
            mine, other = held.pop(rng.randrange(len(held)))
            ours.release_lease(mine)
            theirs.release_lease(other)
        else:
            target = rng.choice(proxies)
            status = rng.choice([ProxyStatus.ACTIVE] * 3 + list(ProxyStatus))
            result = HealthCheckResult(
                proxy_id=target.id,
                status=status,
                latency_ms=rng.randrange(1, 500),
                protocol=target.protocol,
            )
            assert ours.apply_health_check_result(result) == theirs.apply_health_check_result(
                result
            )
        assert ours.get_pool_stats(pool.name).model_dump(exclude={"collected_at"}) == (  # type: ignore[union-attr]
            theirs.get_pool_stats(pool.name).model_dump(exclude={"collected_at"})  # type: ignore[union-attr]
        )
    assert_consistent(ours, pool)


# -- selectors -------------------------------------------------------------
def test_first_available_follows_insertion_order(storage: MemoryStorage, pool: ProxyPool) -> None:
    a, b, c = (add(storage, pool, max_concurrency=1) for _ in range(3))
    assert pick(storage, pool) == a.id
    held = lease(storage, a)
    assert pick(storage, pool, selector=FIRST) == b.id
    health(storage, b, ProxyStatus.BANNED)
    assert pick(storage, pool) == c.id
    storage.release_lease(held)
    assert pick(storage, pool) == a.id


def test_round_robin_cycles_by_id_and_survives_changes(
    storage: MemoryStorage, pool: ProxyPool
) -> None:
    proxies = sorted((add(storage, pool) for _ in range(5)), key=lambda p: p.id)
    ids = [p.id for p in proxies]
    assert [pick(storage, pool, selector=ROUND_ROBIN) for _ in range(7)] == ids + ids[:2]
    # The cursor is a position in id order: a proxy leaving the rotation does not
    # make the others skip or repeat.
    health(storage, proxies[2], ProxyStatus.BANNED)
    assert [pick(storage, pool, selector=ROUND_ROBIN) for _ in range(4)] == [
        ids[3],
        ids[4],
        ids[0],
        ids[1],
    ]
    health(storage, proxies[2], ProxyStatus.ACTIVE)
    assert pick(storage, pool, selector=ROUND_ROBIN) == ids[2]


def test_round_robin_through_the_manager_spreads_leases(storage: MemoryStorage, pool: ProxyPool) -> None:
    for _ in range(4):
        add(storage, pool, max_concurrency=1)
    manager = ProxyManager(storage)
    seen = Counter()
    for _ in range(40):
        got = manager.acquire_proxy(pool.name, selector=ROUND_ROBIN)
        assert got is not None
        seen[got.proxy_id] += 1
        manager.release_proxy(got)
    assert sorted(seen.values()) == [10, 10, 10, 10]


def test_least_used_prefers_fewest_leases_then_oldest_check(
    storage: MemoryStorage, pool: ProxyPool
) -> None:
    now = datetime.now(timezone.utc)
    old = add(storage, pool, checked_at=now - timedelta(hours=1))
    new = add(storage, pool, checked_at=now)
    assert pick(storage, pool, selector=LEAST_USED) == old.id
    first = lease(storage, old)
    assert pick(storage, pool, selector=LEAST_USED) == new.id
    lease(storage, new)
    lease(storage, new)
    assert pick(storage, pool, selector=LEAST_USED) == old.id
    storage.release_lease(first)
    assert pick(storage, pool, selector=LEAST_USED) == old.id
    # A health check refreshes checked_at, which moves the proxy back in the queue.
    health(storage, old, ProxyStatus.ACTIVE)
    lease(storage, old)
    lease(storage, old)
    assert pick(storage, pool, selector=LEAST_USED) == new.id


def test_lowest_latency_uses_latest_reachable_latency() -> None:
    storage = MemoryStorage(health_history=2)
    pool = bootstrap_pool(storage, name="lat")
    slow, fast, unmeasured = add(storage, pool), add(storage, pool), add(storage, pool)
    health(storage, slow, ProxyStatus.ACTIVE, latency_ms=300)
    health(storage, fast, ProxyStatus.ACTIVE, latency_ms=20)
    assert pick(storage, pool, selector=LOWEST_LATENCY) == fast.id
    health(storage, fast, ProxyStatus.ACTIVE, latency_ms=900)
    assert pick(storage, pool, selector=LOWEST_LATENCY) == slow.id
    # Unreachable observations push the good one out of the 2-record ring, yet it
    # remains the proxy's latest reachable latency, as pharox would compute it.
    for _ in range(3):
        storage.save_health_record(
            ProxyHealthRecord(
                proxy_id=fast.id,
                reachable=False,
                protocol=fast.protocol,
                status_after=ProxyStatus.ACTIVE,
            )
        )
    health(storage, slow, ProxyStatus.ACTIVE, latency_ms=1000)
    assert pick(storage, pool, selector=LOWEST_LATENCY) == fast.id
    health(storage, slow, ProxyStatus.BANNED)
    health(storage, fast, ProxyStatus.INACTIVE)
    assert pick(storage, pool, selector=LOWEST_LATENCY) == unmeasured.id


# -- filters ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "wanted", "other"),
    [
        ("country", "AR", "BR"),
        ("source", "feed-a", "feed-b"),
        ("city", "Lima", "Quito"),
        ("isp", "isp-a", "isp-b"),
        ("asn", 64500, 64501),
    ],
)
def test_scalar_filter(storage: MemoryStorage, pool: ProxyPool, field: str, wanted: Any, other: Any) -> None:
    for _ in range(50):  # more than the scan threshold: exercises the walk too
        add(storage, pool, **{field: other})
    target = add(storage, pool, **{field: wanted})
    for selector in SelectorStrategy:
        assert pick(storage, pool, filters=ProxyFilters(**{field: wanted}), selector=selector) == target.id
    health(storage, target, ProxyStatus.BANNED)
    assert pick(storage, pool, filters=ProxyFilters(**{field: wanted})) is None
    assert pick(storage, pool, filters=ProxyFilters(**{field: "nowhere" if field != "asn" else 1})) is None


def test_empty_text_filter_means_no_constraint(storage: MemoryStorage, pool: ProxyPool) -> None:
    proxy = add(storage, pool, country="AR")
    assert pick(storage, pool, filters=ProxyFilters(country="")) == proxy.id


def test_composite_predicate_and_geo_filters(storage: MemoryStorage, pool: ProxyPool) -> None:
    lima = add(storage, pool, country="PE", source="a", latitude=-12.05, longitude=-77.04)
    quito = add(storage, pool, country="EC", source="b", latitude=-0.18, longitude=-78.47)
    add(storage, pool, country="PE", source="b")  # no coordinates
    near_lima = ProxyFilters(latitude=-12.0, longitude=-77.0, radius_km=50)
    assert pick(storage, pool, filters=near_lima) == lima.id
    exact = ProxyFilters(latitude=-0.18, longitude=-78.47)
    assert pick(storage, pool, filters=exact) == quito.id
    composite = ProxyFilters(
        any_of=[ProxyFilters(country="EC"), ProxyFilters(source="a")],
        none_of=[ProxyFilters(country="EC")],
        predicate=lambda p: p.latitude is not None,
    )
    assert pick(storage, pool, filters=composite) == lima.id
    contradiction = ProxyFilters(all_of=[ProxyFilters(country="PE"), ProxyFilters(country="EC")])
    assert pick(storage, pool, filters=contradiction) is None


class _MustNotBeCalled(ProtocolFilter):
    def __call__(self, proxy: Proxy) -> bool:
        raise AssertionError("protocol restriction should come from the index")


def test_protocol_filter_answered_from_index(storage: MemoryStorage, pool: ProxyPool) -> None:
    for _ in range(40):
        add(storage, pool, protocol=ProxyProtocol.HTTP)
    socks = add(storage, pool, protocol=ProxyProtocol.SOCKS5, country="DE")
    https = add(storage, pool, protocol=ProxyProtocol.HTTPS)
    only_socks = ProxyFilters(predicate=_MustNotBeCalled(["socks5", "socks4"]))
    for selector in SelectorStrategy:
        assert pick(storage, pool, filters=only_socks, selector=selector) == socks.id
    nested = ProxyFilters(
        all_of=[ProxyFilters(country="DE")], predicate=_MustNotBeCalled(["socks5"])
    )
    assert pick(storage, pool, filters=nested) == socks.id
    # The shape the core builds: caller filters under all_of, protocols on top.
    core = with_protocols(ProxyFilters(predicate=lambda p: p.port == https.port), ["https"])
    assert pick(storage, pool, filters=core) == https.id
    assert pick(storage, pool, filters=ProxyFilters(predicate=_MustNotBeCalled(["socks4"]))) is None
    # Indexes built above must keep other protocols out as proxies come and change.
    late_http = add(storage, pool, protocol=ProxyProtocol.HTTP)
    health(storage, late_http, ProxyStatus.ACTIVE, latency_ms=1)
    for selector in SelectorStrategy:
        assert pick(storage, pool, filters=only_socks, selector=selector) == socks.id
    health(storage, socks, ProxyStatus.BANNED)
    assert pick(storage, pool, filters=only_socks) is None
    health(storage, socks, ProxyStatus.ACTIVE, latency_ms=2)
    assert pick(storage, pool, filters=only_socks, selector=LOWEST_LATENCY) == socks.id
    assert pick(storage, pool, selector=LOWEST_LATENCY) == late_http.id


# -- concurrency limits, expiry, status changes ---------------------------
def test_max_concurrency(storage: MemoryStorage, pool: ProxyPool) -> None:
    proxy = add(storage, pool, max_concurrency=2)
    first, second = lease(storage, proxy), lease(storage, proxy)
    assert pick(storage, pool) is None
    with pytest.raises(ProxyUnavailableError):
        lease(storage, proxy)
    stats = storage.get_pool_stats(pool.name)
    assert stats is not None and (stats.available_proxies, stats.total_leases) == (0, 2)
    storage.release_lease(first)
    storage.release_lease(first)  # idempotent
    assert pick(storage, pool) == proxy.id
    storage.release_lease(second)
    assert storage.get_proxy(str(proxy.id)).current_leases == 0
    assert_consistent(storage, pool)


def test_create_lease_refuses_benched_proxy(storage: MemoryStorage, pool: ProxyPool) -> None:
    proxy = add(storage, pool)
    found = storage.find_available_proxy(pool.name)
    assert found is not None
    health(storage, proxy, ProxyStatus.BANNED)  # benched between find and lease
    with pytest.raises(ProxyUnavailableError):
        lease(storage, found)


def test_cleanup_releases_expired_leases_in_time_order(storage: MemoryStorage, pool: ProxyPool) -> None:
    short_proxy, long_proxy, kept_proxy = (add(storage, pool, max_concurrency=1) for _ in range(3))
    short = lease(storage, short_proxy, seconds=1)
    long = lease(storage, long_proxy, seconds=2)
    released_early = lease(storage, kept_proxy, seconds=1)
    storage.release_lease(released_early)
    assert storage.cleanup_expired_leases() == 0
    time.sleep(1.1)
    assert storage.cleanup_expired_leases() == 1
    assert storage.get_lease(str(short.id)).status == "released"  # type: ignore[union-attr]
    assert storage.get_lease(str(long.id)).status == "active"  # type: ignore[union-attr]
    assert pick(storage, pool) == short_proxy.id
    time.sleep(1.0)
    assert storage.cleanup_expired_leases() == 1
    assert storage.active_lease_count() == 0
    assert_consistent(storage, pool)


def test_status_changes_move_proxies_in_and_out(storage: MemoryStorage, pool: ProxyPool) -> None:
    proxy = add(storage, pool, country="AR")
    for selector in SelectorStrategy:  # build every selector index first
        assert pick(storage, pool, selector=selector) == proxy.id
    for status in (ProxyStatus.BANNED, ProxyStatus.SLOW, ProxyStatus.INACTIVE):
        health(storage, proxy, status)
        assert all(pick(storage, pool, selector=s) is None for s in SelectorStrategy)
        assert [p.id for p in storage.list_proxies_by_status(pool.name, [status])] == [proxy.id]
        assert_consistent(storage, pool)
        health(storage, proxy, ProxyStatus.ACTIVE)
        assert all(pick(storage, pool, selector=s) == proxy.id for s in SelectorStrategy)
    # save_proxy: status and indexed fields change together.
    changed = storage.get_proxy(str(proxy.id)).model_copy(
        update={"status": ProxyStatus.INACTIVE, "country": "BR"}
    )
    storage.save_proxy(changed)
    assert pick(storage, pool) is None
    storage.save_proxy(changed.model_copy(update={"status": ProxyStatus.ACTIVE}))
    assert pick(storage, pool, filters=ProxyFilters(country="AR")) is None
    assert pick(storage, pool, filters=ProxyFilters(country="BR")) == proxy.id
    assert_consistent(storage, pool)


def test_health_history_is_a_ring_buffer() -> None:
    storage = MemoryStorage(health_history=4)
    pool = bootstrap_pool(storage, name="ring")
    proxy = add(storage, pool)
    for latency in range(1, 11):
        health(storage, proxy, ProxyStatus.ACTIVE, latency_ms=latency)
    records = storage.list_health_records(proxy.id)
    assert [r.latency_ms for r in records] == [10, 9, 8, 7]
    assert [r.id for r in storage.list_health_records(proxy.id)] == [r.id for r in records]
    assert records[0].status_before == ProxyStatus.ACTIVE and records[0].reachable
    assert [r.latency_ms for r in storage.list_health_records(proxy.id, limit=2)] == [10, 9]
    last = storage.get_last_health_result(proxy.id)
    assert last is not None and last.latency_ms == 10
    assert storage.get_last_health_result(add(storage, pool).id) is None
    with pytest.raises(ValueError, match="health_history"):
        MemoryStorage(health_history=0)


# -- CRUD and copies -------------------------------------------------------
def test_pool_crud(storage: MemoryStorage) -> None:
    pool = ProxyPool(name="one")
    storage.save_pool(pool)
    assert storage.get_pool(str(pool.id)) == pool
    storage.save_pool(pool.model_copy(update={"name": "renamed"}))
    assert storage.get_pool_by_name("one") is None
    assert storage.get_pool_by_name("renamed") is not None
    assert [p.name for p in storage.list_pools()] == ["renamed"]
    proxy = add(storage, pool)
    held = lease(storage, proxy)
    storage.delete_pool(str(pool.id))
    assert storage.list_pools() == []
    assert storage.get_proxy_by_id(proxy.id) is None
    assert storage.get_lease(str(held.id)) is None
    storage.release_lease(held)  # a lease of a deleted pool is simply gone
    for call in (storage.get_pool, storage.delete_pool, storage.list_proxies):
        with pytest.raises(PoolNotFoundError):
            call(str(pool.id))
    with pytest.raises(PoolNotFoundError):
        storage.get_pool("not-a-uuid")


def test_proxy_crud_and_leases(storage: MemoryStorage, pool: ProxyPool) -> None:
    a, b = add(storage, pool), add(storage, pool)
    assert [p.id for p in storage.list_proxies(str(pool.id))] == [a.id, b.id]
    held = lease(storage, a)
    consumer = storage.ensure_consumer("c")
    assert [x.id for x in storage.list_leases(str(consumer))] == [held.id]
    assert storage.list_leases(str(UUID(int=1))) == []
    storage.delete_proxy(str(a.id))
    assert storage.get_lease(str(held.id)) is None
    assert_consistent(storage, pool)
    for call in (storage.get_proxy, storage.delete_proxy):
        with pytest.raises(ProxyNotFoundError):
            call(str(a.id))
    other_pool = bootstrap_pool(storage, name="other")
    storage.save_proxy(b.model_copy(update={"pool_id": other_pool.id}))
    assert pick(storage, pool) is None
    assert pick(storage, other_pool) == b.id
    assert_consistent(storage, other_pool)
    ghost = b.model_copy(update={"pool_id": UUID(int=5), "id": UUID(int=6)})
    with pytest.raises(PoolNotFoundError):
        storage.add_proxies_bulk([b.model_copy(update={"id": UUID(int=7)}), ghost])
    assert storage.get_proxy_by_id(UUID(int=7)) is None  # all or nothing


def test_handed_out_objects_are_copies(storage: MemoryStorage, pool: ProxyPool) -> None:
    original = add(storage, pool, credentials=ProxyCredentials(user="u", password="secret"))
    original.credentials.password = "changed-after-add"  # type: ignore[union-attr]
    found = storage.find_available_proxy(pool.name)
    assert found is not None and found.credentials is not None
    assert found.credentials.password == "secret"
    found.credentials.password = "tampered"
    found.status = ProxyStatus.BANNED
    stored = storage.get_proxy(str(original.id))
    assert stored.status == ProxyStatus.ACTIVE
    assert stored.credentials is not None and stored.credentials.password == "secret"
    held = lease(storage, original)
    held.status = "released"  # type: ignore[assignment]
    assert storage.get_lease(str(held.id)).status == "active"  # type: ignore[union-attr]


# -- threads and bounded history -------------------------------------------
@pytest.mark.parametrize("selector", [ROUND_ROBIN, LEAST_USED, FIRST])
def test_eight_threads_through_the_manager(selector: SelectorStrategy) -> None:
    storage = MemoryStorage()
    pool = bootstrap_pool(storage, name="threads")
    limits = {add(storage, pool, max_concurrency=1 + i % 2).id: 1 + i % 2 for i in range(12)}
    manager = ProxyManager(storage)
    holders: Counter[UUID] = Counter()
    guard = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(300):
                try:
                    got = manager.acquire_proxy(pool.name, selector=selector)
                except ProxyUnavailableError:
                    continue  # lost the find→lease race: pharox's two-call protocol
                if got is None:
                    continue
                with guard:
                    holders[got.proxy_id] += 1
                    assert holders[got.proxy_id] <= limits[got.proxy_id]
                with guard:
                    holders[got.proxy_id] -= 1
                manager.release_proxy(got)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(p.current_leases == 0 for p in storage.list_proxies(str(pool.id)))
    stats = storage.get_pool_stats(pool.name)
    assert stats is not None
    assert (stats.total_leases, stats.leased_proxies, stats.available_proxies) == (0, 0, 12)
    assert storage.active_lease_count() == 0
    assert_consistent(storage, pool)


def test_lease_history_does_not_grow() -> None:
    storage = MemoryStorage(released_window=100)
    pool = bootstrap_pool(storage, name="history")
    for _ in range(10):
        add(storage, pool, max_concurrency=1)
    manager = ProxyManager(storage)
    first = None
    for _ in range(5000):
        got = manager.acquire_proxy(pool.name, selector=ROUND_ROBIN)
        assert got is not None
        first = first or got
        manager.release_proxy(got)
    assert len(storage.list_leases()) == 100
    assert storage.get_lease(str(first.id)) is None  # type: ignore[union-attr]
    assert storage.active_lease_count() == 0
    last = storage.get_lease(str(got.id))  # the window still answers, as pharox Leases
    assert last is not None and last.released_at is not None and last.proxy_id == got.proxy_id
    assert last.consumer_id == got.consumer_id and last.pool_id == pool.id
    # Internal: the window is kept as plain tuples the garbage collector stops tracking.
    gc.collect()
    assert not any(gc.is_tracked(kept) for kept in storage._released.values())
    # Internal: the expiry heap drops entries of leases released before expiring.
    assert len(storage._expiry) <= 2 * 1024 + 1


def test_one_step_acquire_agrees_with_find_then_lease(storage: MemoryStorage, pool: ProxyPool) -> None:
    """`acquire_lease` picks what find_available_proxy would, leases it, honours
    filters/concurrency, sweeps expired leases first and says None when nothing is left."""
    us = add(storage, pool, country="US", max_concurrency=1)
    add(storage, pool, country="DE", max_concurrency=1)
    only_us = ProxyFilters(country="US")
    assert pick(storage, pool, filters=only_us) == us.id
    got = storage.acquire_lease(pool.name, "new-consumer", 1, only_us, SelectorStrategy.ROUND_ROBIN)
    assert got is not None and got.proxy_id == us.id and got.pool_name == "main"
    assert storage.acquire_lease(pool.name, "new-consumer", 60, only_us) is None  # at capacity
    assert storage.acquire_lease("no-such-pool", "c", 60) is None
    assert_consistent(storage, pool)
    time.sleep(1.1)
    again = storage.acquire_lease(pool.name, "new-consumer", 60, only_us)  # the expired one was swept
    assert again is not None and again.proxy_id == us.id
    storage.release_lease(again)
    assert storage.get_proxy(str(us.id)).current_leases == 0
    with pytest.raises(InvalidLeaseError):
        storage.acquire_lease(pool.name, "c", 0)


def test_repeated_picks_follow_pool_and_proxy_changes(storage: MemoryStorage) -> None:
    """The one-step acquire remembers which index answered the last identical call;
    a pool deleted and made again under the same name, a rename, a proxy deleted
    while leased and added back, and a filter on another field are all still seen."""
    only_http = with_protocols(None, [ProxyProtocol.HTTP])
    first = bootstrap_pool(storage, name="main")
    a = add(storage, first)
    got = storage.acquire_lease("main", "c", 60, only_http, ROUND_ROBIN)
    assert got is not None and got.proxy_id == a.id
    storage.release_lease(got)
    storage.delete_pool(str(first.id))
    assert storage.acquire_lease("main", "c", 60, only_http, ROUND_ROBIN) is None
    second = bootstrap_pool(storage, name="main")
    b = add(storage, second)
    got = storage.acquire_lease("main", "c", 60, only_http, ROUND_ROBIN)
    assert got is not None and got.proxy_id == b.id
    storage.save_pool(second.model_copy(update={"name": "renamed"}))
    assert storage.acquire_lease("main", "c", 60, only_http, ROUND_ROBIN) is None
    # `b` deleted while `got` is live, then added back: the old record no longer counts.
    storage.delete_proxy(str(b.id))
    storage.add_proxy(b)
    storage.release_lease(got)
    assert storage.get_proxy(str(b.id)).current_leases == 0
    again = storage.acquire_lease("renamed", "c", 60, only_http, ROUND_ROBIN)
    assert again is not None and again.proxy_id == b.id
    assert storage.get_proxy(str(b.id)).current_leases == 1
    storage.release_lease(again)
    assert storage.get_proxy(str(b.id)).current_leases == 0
    assert storage.acquire_lease("renamed", "c", 60, ProxyFilters(country="US"), ROUND_ROBIN) is None
    renamed = storage.get_pool_by_name("renamed")
    assert renamed is not None
    assert_consistent(storage, renamed)


@pytest.mark.parametrize("selector", [FIRST, ROUND_ROBIN, LEAST_USED, LOWEST_LATENCY])
def test_acquire_passes_over_excluded_proxies_in_selector_order(
    storage: MemoryStorage, pool: ProxyPool, selector: SelectorStrategy
) -> None:
    proxies = [add(storage, pool) for _ in range(5)]
    socks = add(storage, pool, protocol=ProxyProtocol.SOCKS5)
    excluded = {p.id for p in proxies[:3]}
    http_only = with_protocols(None, frozenset({ProxyProtocol.HTTP}))
    got = []
    for _ in range(4):
        lease = storage.acquire_lease("main", "c", 60, http_only, selector, exclude=excluded)
        assert lease is not None
        got.append(lease.proxy_id)
        storage.release_lease(lease)
    assert set(got) <= {proxies[3].id, proxies[4].id}  # never an excluded one, never the SOCKS5 one
    if selector is ROUND_ROBIN:
        assert set(got) == {proxies[3].id, proxies[4].id}  # the cursor moves past each pick
    everything = excluded | {proxies[3].id, proxies[4].id}
    assert storage.acquire_lease("main", "c", 60, http_only, selector, exclude=everything) is None
    lease = storage.acquire_lease("main", "c", 60, None, selector, exclude=everything)
    assert lease is not None and lease.proxy_id == socks.id
