"""Per-site holds: one contract for every `SiteStore`, and what only SQL promises.

The contract runs on `MemorySiteStore` and on `SqlSiteStore` over SQLite, PostgreSQL and
MariaDB.  The SQL part checks what sharing a database means: two storage objects and
two OS processes see one set of holds, concurrent claims of a pair have one winner,
holds go with their proxy, and a database made at revision 0001 gets the table.

Run as a script, this file is the claiming worker process (see `_claimer_main`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import sqlalchemy as sa
from pharox import Proxy, ProxyPool, ProxyProtocol, ProxyStatus

from pharox_integrations.errors import StorageUnavailable
from pharox_integrations.sites import BAN, COOLDOWN, DELAY, Hold, MemorySiteStore, SiteStore, store_for
from pharox_integrations.storage.memory import MemoryStorage
from pharox_integrations.storage.sql import ALEMBIC_VERSION_TABLE, SqlStorage, _run_migrations, init_schema, make_engine
from pharox_integrations.storage.sql_sites import SITE_KEY_MAX, SqlSiteStore

if __package__:
    from .sqlhelpers import backend_params, private_database
else:
    from sqlhelpers import backend_params, private_database

NOW = 1_800_000_000.123456  # the stores take `now` as an argument: no clock in the contract
TABLE = "pxi_site_holds"


@dataclass
class Subject:
    """A store under test, and how to make a proxy it may hold (SQL: a real row)."""

    store: SiteStore
    new_proxy: Callable[[], UUID]
    storage: SqlStorage | None = None


def _seed_pool(storage: SqlStorage, name: str = "sites") -> ProxyPool:
    pool = ProxyPool(name=name)
    storage.add_pool(pool)
    return pool


def _add_proxies(storage: SqlStorage, pool: ProxyPool, n: int) -> list[UUID]:
    items = [
        Proxy(
            host=f"127.0.{i // 250}.{i % 250 + 1}",
            port=3128,
            protocol=ProxyProtocol.HTTP,
            pool_id=pool.id,
            status=ProxyStatus.ACTIVE,
        )
        for i in range(n)
    ]
    storage.add_proxies_bulk(items)
    return [p.id for p in items]


def _sql_subject(url: str) -> tuple[Subject, SqlStorage]:
    storage = SqlStorage(url, pool_size=8)
    pool = _seed_pool(storage)
    return Subject(storage.site_store(), lambda: _add_proxies(storage, pool, 1)[0], storage), storage


@pytest.fixture(params=[pytest.param("memory", id="memory"), *backend_params()])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    if request.param == "memory":
        yield Subject(MemorySiteStore(), uuid4)
        return
    with private_database(request.param, tmp_path) as url:
        init_schema(url)  # a new database: 0001 and 0002 in one go
        made, storage = _sql_subject(url)
        try:
            yield made
        finally:
            storage.close()


@pytest.fixture(params=backend_params())
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with private_database(request.param, tmp_path) as url:
        init_schema(url)
        yield url


# ---------------------------------------------------------------------- the contract


def test_local_says_whether_reads_are_in_process(subject: Subject) -> None:
    assert subject.store.local is (subject.storage is None)


def test_put_get_and_replace(subject: Subject) -> None:
    store, pid = subject.store, subject.new_proxy()
    assert store.get(pid, "shop.example") is None
    ban = Hold(NOW + 30.654321, BAN, 2, NOW + 330.000001)
    store.put(pid, "shop.example", ban)
    got = store.get(pid, "shop.example")
    assert got == ban  # exact floats: double precision, microseconds of an epoch survive
    assert got is not None and type(got.until) is float and type(got.strikes) is int
    assert store.get(pid, "other.example") is None
    assert store.get(subject.new_proxy(), "shop.example") is None
    cooldown = Hold(NOW + 5.5, COOLDOWN, 2, NOW + 400.25)
    store.put(pid, "shop.example", cooldown)  # an upsert: replaces every field
    assert store.get(pid, "shop.example") == cooldown
    over = Hold(NOW - 1.0, BAN, 4, NOW + 100.0)
    store.put(pid, "shop.example", over)
    assert store.get(pid, "shop.example") == over  # over, but its strikes still count


def test_holds_are_those_in_force_of_that_site(subject: Subject) -> None:
    store = subject.store
    a, b, c, d = (subject.new_proxy() for _ in range(4))
    store.put(a, "shop.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
    store.put(b, "shop.example", Hold(NOW + 0.000001, DELAY, 0, NOW + 0.000001))
    store.put(c, "shop.example", Hold(NOW, COOLDOWN, 3, NOW + 50.0))  # ends exactly now: over
    store.put(d, "shop.example", Hold(NOW - 5.0, BAN, 2, NOW + 50.0))
    store.put(d, "news.example", Hold(NOW + 7.0, COOLDOWN, 0, NOW + 7.0))
    held = store.holds("shop.example", NOW)
    assert held == {
        a: Hold(NOW + 10.0, BAN, 1, NOW + 100.0),
        b: Hold(NOW + 0.000001, DELAY, 0, NOW + 0.000001),
    }
    assert all(isinstance(k, UUID) for k in held)
    assert store.holds("news.example", NOW) == {d: Hold(NOW + 7.0, COOLDOWN, 0, NOW + 7.0)}
    assert store.holds("shop.example", NOW + 10.0) == {}
    assert store.holds("nobody.example", NOW) == {}


def test_claim_a_free_pair(subject: Subject) -> None:
    store, pid = subject.store, subject.new_proxy()
    assert store.claim(pid, "shop.example", NOW + 2.5, NOW) is True
    assert store.get(pid, "shop.example") == Hold(NOW + 2.5, DELAY, 0, NOW + 2.5)
    assert store.holds("shop.example", NOW) == {pid: Hold(NOW + 2.5, DELAY, 0, NOW + 2.5)}


def test_a_pair_in_force_is_never_claimed(subject: Subject) -> None:
    store = subject.store
    pid, banned = subject.new_proxy(), subject.new_proxy()
    assert store.claim(pid, "shop.example", NOW + 2.0, NOW)
    assert store.claim(pid, "shop.example", NOW + 9.0, NOW + 1.999999) is False
    assert store.get(pid, "shop.example") == Hold(NOW + 2.0, DELAY, 0, NOW + 2.0)  # untouched
    ban = Hold(NOW + 60.0, BAN, 3, NOW + 600.0)
    store.put(banned, "shop.example", ban)
    assert store.claim(banned, "shop.example", NOW + 1.0, NOW) is False
    assert store.get(banned, "shop.example") == ban
    assert store.claim(banned, "news.example", NOW + 1.0, NOW) is True  # another site: free


def test_an_expired_pair_is_claimed_and_keeps_its_strikes(subject: Subject) -> None:
    store = subject.store
    pid, short = subject.new_proxy(), subject.new_proxy()
    store.put(pid, "shop.example", Hold(NOW - 1.0, BAN, 3, NOW + 500.5))
    assert store.claim(pid, "shop.example", NOW + 2.0, NOW) is True
    # strikes kept, keep_until the later of the old one and the new hold's end
    assert store.get(pid, "shop.example") == Hold(NOW + 2.0, DELAY, 3, NOW + 500.5)
    store.put(short, "shop.example", Hold(NOW - 3.0, COOLDOWN, 1, NOW - 1.0))
    assert store.claim(short, "shop.example", NOW + 2.0, NOW) is True
    assert store.get(short, "shop.example") == Hold(NOW + 2.0, DELAY, 1, NOW + 2.0)
    # the end of the claimed hold is the boundary: at exactly that time it is over
    assert store.claim(pid, "shop.example", NOW + 4.0, NOW + 2.0) is True
    assert store.get(pid, "shop.example") == Hold(NOW + 4.0, DELAY, 3, NOW + 500.5)


def test_a_zero_delay_claim_always_wins(subject: Subject) -> None:
    """`until == now` is never in force, so with no delay every claim wins, even one
    that changes no stored value (MariaDB's affected-row counts must not fool us)."""
    store, pid = subject.store, subject.new_proxy()
    assert [store.claim(pid, "shop.example", NOW, NOW) for _ in range(3)] == [True, True, True]
    assert store.get(pid, "shop.example") == Hold(NOW, DELAY, 0, NOW)
    assert store.holds("shop.example", NOW) == {}


def test_bans_counts_sites_with_a_ban_in_force(subject: Subject) -> None:
    store = subject.store
    pid, other = subject.new_proxy(), subject.new_proxy()
    assert store.bans(pid, NOW) == 0
    store.put(pid, "a.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
    store.put(pid, "b.example", Hold(NOW + 20.0, BAN, 2, NOW + 100.0))
    store.put(pid, "c.example", Hold(NOW - 1.0, BAN, 5, NOW + 100.0))  # over
    store.put(pid, "d.example", Hold(NOW + 30.0, COOLDOWN, 1, NOW + 100.0))  # not a ban
    store.put(pid, "e.example", Hold(NOW + 30.0, DELAY, 0, NOW + 30.0))  # not a ban
    store.put(other, "a.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))  # another proxy
    assert store.bans(pid, NOW) == 2
    assert store.bans(pid, NOW + 10.0) == 1
    assert store.bans(pid, NOW + 20.0) == 0
    assert store.bans(other, NOW) == 1
    assert store.bans(subject.new_proxy(), NOW) == 0


def test_in_force_of_one_site_and_of_all(subject: Subject) -> None:
    store = subject.store
    a, b = subject.new_proxy(), subject.new_proxy()
    store.put(a, "shop.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
    store.put(b, "shop.example", Hold(NOW - 10.0, BAN, 1, NOW + 100.0))  # over
    store.put(b, "news.example", Hold(NOW + 3.0, COOLDOWN, 0, NOW + 3.0))
    store.put(a, "news.example", Hold(NOW + 1.0, DELAY, 0, NOW + 1.0))
    everything = store.in_force(NOW)
    assert sorted(everything, key=lambda t: (t[1], t[2].until)) == [
        (a, "news.example", Hold(NOW + 1.0, DELAY, 0, NOW + 1.0)),
        (b, "news.example", Hold(NOW + 3.0, COOLDOWN, 0, NOW + 3.0)),
        (a, "shop.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0)),
    ]
    assert store.in_force(NOW, "shop.example") == [(a, "shop.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))]
    assert store.in_force(NOW + 10.0) == []
    assert store.in_force(NOW, "nobody.example") == []


def test_purge_forgets_only_pairs_past_keep_until(subject: Subject) -> None:
    store = subject.store
    a, b, c = subject.new_proxy(), subject.new_proxy(), subject.new_proxy()
    store.put(a, "shop.example", Hold(NOW - 50.0, BAN, 2, NOW - 1.0))  # forgotten
    store.put(b, "shop.example", Hold(NOW - 50.0, BAN, 2, NOW))  # keep_until == now: forgotten
    store.put(c, "shop.example", Hold(NOW - 50.0, BAN, 4, NOW + 1.0))  # over, strikes kept
    store.put(a, "news.example", Hold(NOW + 5.0, COOLDOWN, 0, NOW + 5.0))
    assert store.purge(NOW) == 2
    assert store.get(a, "shop.example") is None
    assert store.get(b, "shop.example") is None
    assert store.get(c, "shop.example") == Hold(NOW - 50.0, BAN, 4, NOW + 1.0)
    assert store.get(a, "news.example") == Hold(NOW + 5.0, COOLDOWN, 0, NOW + 5.0)
    assert store.purge(NOW) == 0
    assert store.purge(NOW + 5.0) == 2
    assert store.in_force(NOW - 100.0) == []


def test_site_keys_longer_than_the_column_stay_distinct(subject: Subject) -> None:
    """A malformed URL can yield a host longer than any DNS name: it must neither fail
    (PostgreSQL, strict MariaDB) nor merge with its neighbours by truncation."""
    store, pid = subject.store, subject.new_proxy()
    long_a = "a" * SITE_KEY_MAX + ".example"
    long_b = "a" * SITE_KEY_MAX + ".example.org"
    store.put(pid, long_a, Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
    assert store.get(pid, long_a) == Hold(NOW + 10.0, BAN, 1, NOW + 100.0)
    assert store.get(pid, long_b) is None
    assert store.claim(pid, long_b, NOW + 1.0, NOW) is True
    assert store.claim(pid, long_a, NOW + 1.0, NOW) is False
    assert store.holds(long_a, NOW) == {pid: Hold(NOW + 10.0, BAN, 1, NOW + 100.0)}
    assert len(store.in_force(NOW)) == 2
    assert store.bans(pid, NOW) == 1


def _race(store: SiteStore, pid: UUID, threads: int) -> list[bool]:
    """`threads` threads released at once, each claiming the pair; what each got."""
    barrier = threading.Barrier(threads)
    results: list[bool] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claim() -> None:
        try:
            barrier.wait(timeout=30)
            won = store.claim(pid, "shop.example", NOW + 60.0, NOW)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            results.append(won)

    workers = [threading.Thread(target=claim) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not errors, errors
    return results


def test_eight_threads_claiming_one_pair_have_one_winner(subject: Subject) -> None:
    store = subject.store
    rounds, threads = 12, 8
    pids = [subject.new_proxy() for _ in range(rounds)]
    for i in range(1, rounds, 2):  # every other pair has an expired hold: the UPDATE path
        store.put(pids[i], "shop.example", Hold(NOW - 1.0, BAN, i, NOW + 900.0))
    for i, pid in enumerate(pids):
        results = _race(store, pid, threads)
        assert sorted(results) == [False] * (threads - 1) + [True], f"round {i}: {results}"
        strikes, keep = (i, NOW + 900.0) if i % 2 else (0, NOW + 60.0)
        assert store.get(pid, "shop.example") == Hold(NOW + 60.0, DELAY, strikes, keep)


# ---------------------------------------------------------------------- SQL only


def test_one_store_per_storage_object() -> None:
    memory = MemoryStorage()
    assert isinstance(memory.site_store(), MemorySiteStore)
    assert memory.site_store() is memory.site_store() is store_for(memory)
    assert MemoryStorage().site_store() is not memory.site_store()
    # two brokers on one memory storage: one set of holds
    pid = uuid4()
    store_for(memory).put(pid, "shop.example", Hold(NOW + 1.0, BAN, 1, NOW + 2.0))
    assert store_for(memory).holds("shop.example", NOW) == {pid: Hold(NOW + 1.0, BAN, 1, NOW + 2.0)}


def test_sql_site_store_is_cached_per_storage(sql_url: str) -> None:
    storage = SqlStorage(sql_url, pool_size=2)
    try:
        store = storage.site_store()
        assert isinstance(store, SqlSiteStore)
        assert store is storage.site_store() is store_for(storage)
        assert store.local is False
        other = SqlStorage(storage.engine)
        assert other.site_store() is not store
    finally:
        storage.close()


def test_holds_go_with_their_proxy_and_pool(sql_url: str) -> None:
    storage = SqlStorage(sql_url, pool_size=2)
    try:
        store = storage.site_store()
        pool = _seed_pool(storage)
        gone, kept = _add_proxies(storage, pool, 2)
        other_pool = _seed_pool(storage, "other")
        (in_other,) = _add_proxies(storage, other_pool, 1)
        for pid in (gone, kept, in_other):
            store.put(pid, "shop.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
            store.put(pid, "news.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
        storage.delete_proxy(str(gone))
        assert store.get(gone, "shop.example") is None and store.get(gone, "news.example") is None
        assert store.bans(gone, NOW) == 0
        assert set(store.holds("shop.example", NOW)) == {kept, in_other}
        storage.delete_pool(str(other_pool.id))
        assert set(store.holds("shop.example", NOW)) == {kept}
        with storage.engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar_one()
        assert rows == 2
    finally:
        storage.close()


def test_a_proxy_the_storage_lacks_is_never_held(sql_url: str) -> None:
    storage = SqlStorage(sql_url, pool_size=2)
    try:
        store = storage.site_store()
        stranger = uuid4()
        store.put(stranger, "shop.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
        assert store.get(stranger, "shop.example") is None
        assert store.claim(stranger, "shop.example", NOW + 1.0, NOW) is False
        assert store.in_force(NOW) == []
    finally:
        storage.close()


def test_two_storages_on_one_database_share_holds_at_once(sql_url: str) -> None:
    first = SqlStorage(sql_url, pool_size=2)
    second = SqlStorage(sql_url, pool_size=2)  # its own engine and connections
    try:
        assert first.engine is not second.engine
        one, two = first.site_store(), second.site_store()
        pool = _seed_pool(first)
        a, b = _add_proxies(first, pool, 2)
        ban = Hold(NOW + 30.0, BAN, 1, NOW + 300.0)
        one.put(a, "shop.example", ban)
        assert two.get(a, "shop.example") == ban
        assert two.holds("shop.example", NOW) == {a: ban}
        assert two.bans(a, NOW) == 1
        assert two.claim(a, "shop.example", NOW + 1.0, NOW) is False
        assert two.claim(b, "shop.example", NOW + 1.0, NOW) is True
        assert one.claim(b, "shop.example", NOW + 1.0, NOW) is False
        assert one.holds("shop.example", NOW) == {a: ban, b: Hold(NOW + 1.0, DELAY, 0, NOW + 1.0)}
        assert two.purge(NOW + 300.0) == 2
        assert one.get(a, "shop.example") is None and one.in_force(NOW) == []
    finally:
        first.close()
        second.close()


def test_holds_of_a_site_are_one_indexed_query(sql_url: str) -> None:
    storage = SqlStorage(sql_url, pool_size=2)
    try:
        store = storage.site_store()
        pool = _seed_pool(storage)
        for pid in _add_proxies(storage, pool, 3):
            store.put(pid, "shop.example", Hold(NOW + 10.0, BAN, 1, NOW + 100.0))
        seen: list[tuple[str, Any]] = []

        def watch(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            seen.append((statement, parameters))

        sa.event.listen(storage.engine, "before_cursor_execute", watch)
        try:
            assert len(store.holds("shop.example", NOW)) == 3
        finally:
            sa.event.remove(storage.engine, "before_cursor_execute", watch)
        ours = [(s, p) for s, p in seen if TABLE in s]
        assert len(ours) == 1, seen
        statement, parameters = ours[0]
        dialect = storage.engine.dialect.name
        with storage.engine.connect() as conn:
            if dialect == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan TO off")  # a 3-row table: force the choice
                plan = " ".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
            elif dialect == "sqlite":
                plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters))
            else:
                plan = " ".join(
                    str(r._mapping["possible_keys"]) for r in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
                )
        assert "pxi_site_holds_site_until" in plan, plan
    finally:
        storage.close()


def test_an_unreachable_database_is_one_clear_error() -> None:
    storage = SqlStorage("postgresql+psycopg://pxuser:s3cret-pw@127.0.0.1:9/nodb", pool_size=1)
    try:
        store = storage.site_store()
        for attempt in (
            lambda: store.holds("shop.example", NOW),
            lambda: store.claim(uuid4(), "shop.example", NOW + 1.0, NOW),
        ):
            with pytest.raises(StorageUnavailable) as info:
                attempt()
            message = str(info.value)
            assert "127.0.0.1:9" in message and "s3cret-pw" not in message
            assert info.value.transient is True  # type: ignore[attr-defined]
    finally:
        storage.close()


def test_a_database_without_any_schema_says_so(tmp_path: Path) -> None:
    storage = SqlStorage(f"sqlite:///{tmp_path / 'empty.db'}", pool_size=1)
    try:
        with pytest.raises(StorageUnavailable) as info:
            storage.site_store().claim(uuid4(), "shop.example", NOW + 1.0, NOW)
        assert "no pharox-integrations schema" in str(info.value)
        assert info.value.kind == "no_schema"  # type: ignore[attr-defined]
    finally:
        storage.close()


# ---------------------------------------------------------------------- upgrade from 0001


def _revision(url: str) -> tuple[str, set[str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text(f"SELECT version_num FROM {ALEMBIC_VERSION_TABLE}")).scalar_one()
        return version, set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", backend_params())
def test_a_0001_database_gets_the_table_when_the_storage_opens_it(backend: str, tmp_path: Path) -> None:
    with private_database(backend, tmp_path) as url:
        engine = make_engine(url, pool_size=1)
        try:
            _run_migrations(engine, "0001")  # what an installation of the first release made
        finally:
            engine.dispose()
        assert _revision(url)[0] == "0001"
        assert TABLE not in _revision(url)[1]
        old = SqlStorage(url, pool_size=2)
        try:
            (pid,) = _add_proxies(old, _seed_pool(old), 1)
            with pytest.raises(StorageUnavailable) as info:
                old.site_store().holds("shop.example", NOW)
            message = str(info.value)
            assert "predates per-site holds" in message and "db init" in message, message
            assert info.value.kind == "no_schema"  # type: ignore[attr-defined]

            upgraded = SqlStorage(url, pool_size=2, create_schema=True)  # as 0001 was applied
            try:
                version, tables = _revision(url)
                assert version == "0002" and TABLE in tables
                engine = sa.create_engine(url)
                try:
                    inspector = sa.inspect(engine)
                    assert {ix["name"] for ix in inspector.get_indexes(TABLE)} >= {
                        "pxi_site_holds_site_until",
                        "pxi_site_holds_keep",
                    }
                    (fk,) = inspector.get_foreign_keys(TABLE)
                    assert fk["referred_table"] == "pxi_proxies" and fk["constrained_columns"] == ["proxy_id"]
                    assert str(fk["options"].get("ondelete", "")).upper() == "CASCADE"
                    assert inspector.get_pk_constraint(TABLE)["constrained_columns"] == ["proxy_id", "site"]
                finally:
                    engine.dispose()
                # the proxy made before the upgrade can be held, seen by the old object too
                upgraded.site_store().put(pid, "shop.example", Hold(NOW + 5.0, BAN, 1, NOW + 50.0))
                assert old.site_store().get(pid, "shop.example") == Hold(NOW + 5.0, BAN, 1, NOW + 50.0)
            finally:
                upgraded.close()
            init_schema(url)  # at head already: nothing to do
            assert _revision(url)[0] == "0002"
        finally:
            old.close()


def test_init_schema_upgrades_a_0001_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url, pool_size=1)
    try:
        _run_migrations(engine, "0001")
    finally:
        engine.dispose()
    init_schema(url)  # `pharox-integrations db init --storage URL`
    version, tables = _revision(url)
    assert version == "0002" and TABLE in tables


# ---------------------------------------------------------------------- processes

PROCESSES = 2
THREADS = 4
SITES = 20
PROXIES = 6


def _spawn(url: str, pairs_file: Path, start_at: float, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, url, str(pairs_file), repr(start_at), str(out)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("backend", backend_params())
def test_processes_claiming_the_same_pairs_win_each_once(backend: str, tmp_path: Path) -> None:
    with private_database(backend, tmp_path) as url:
        init_schema(url)
        storage = SqlStorage(url, pool_size=2)
        spawned: list[subprocess.Popen[str]] = []
        try:
            store = storage.site_store()
            pids = _add_proxies(storage, _seed_pool(storage), PROXIES)
            pairs = [(str(pid), f"site{s}.example") for pid in pids for s in range(SITES)]
            expired = set(pairs[::2])  # half start with a hold that is over: claims update them
            for pid, site in expired:
                store.put(UUID(pid), site, Hold(time.time() - 1.0, BAN, 2, time.time() + 3600.0))
            pairs_file = tmp_path / "pairs.json"
            pairs_file.write_text(json.dumps(pairs))
            start_at = time.time() + 3.0  # after both interpreters have imported
            outs = [tmp_path / f"claimer{i}.json" for i in range(PROCESSES)]
            spawned = [_spawn(url, pairs_file, start_at, out) for out in outs]
            for proc in spawned:
                _, err = proc.communicate(timeout=240)
                assert proc.returncode == 0, err
            results = [json.loads(out.read_text()) for out in outs]
            wins: Counter[tuple[str, str]] = Counter()
            for result in results:
                assert result["errors"] == []
                assert result["attempts"] == len(pairs) * THREADS
                wins.update((pid, site) for pid, site in result["wins"])
            assert set(wins) == set(pairs) and set(wins.values()) == {1}, [p for p, n in wins.items() if n != 1]
            # they really raced: each process was still claiming while the other was
            (a0, a1), (b0, b1) = (r["span"] for r in results)
            assert a0 < b1 and b0 < a1, "the processes did not overlap"
            for pid, site in pairs:
                hold = store.get(UUID(pid), site)
                assert hold is not None and hold.kind == DELAY
                assert hold.strikes == (2 if (pid, site) in expired else 0)
        finally:
            for proc in spawned:  # never leave a worker behind when an assertion fails
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            storage.close()


def _claimer_main(url: str, pairs_file: str, start_at: float, out: str) -> None:
    """One worker process: THREADS threads claim every pair, all in the same order so
    they collide on each pair, with holds long enough to last the whole run."""
    storage = SqlStorage(url, pool_size=THREADS + 1)
    store = storage.site_store()
    pairs = [(UUID(pid), site) for pid, site in json.loads(Path(pairs_file).read_text())]
    wins: list[tuple[str, str]] = []
    errors: list[str] = []
    attempts = [0]
    lock = threading.Lock()
    span = [float("inf"), 0.0]

    def claim_all() -> None:
        first = time.time()
        for pid, site in pairs:
            try:
                now = time.time()
                won = store.claim(pid, site, now + 3600.0, now)
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return
            with lock:
                attempts[0] += 1
                if won:
                    wins.append((str(pid), site))
        last = time.time()
        with lock:
            span[0] = min(span[0], first)
            span[1] = max(span[1], last)

    time.sleep(max(0.0, start_at - time.time()))
    threads = [threading.Thread(target=claim_all) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps({"wins": wins, "errors": errors, "attempts": attempts[0], "span": span}))
    storage.close()


if __name__ == "__main__":
    _claimer_main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
