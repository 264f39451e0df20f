"""Leases per second of SqlStorage vs pharox's PostgresStorage, and the cost of history.

One lease = acquire + report (`apply_health_check_result`) + release.  The "manager"
rows go through `pharox.ProxyManager` exactly as pharox users do (ensure_consumer,
cleanup, find, create, stats, release, stats); the "acquire_lease" rows use
SqlStorage's one-transaction extension that the core prefers.  Every proxy has
`max_concurrency=1` and the selector is ROUND_ROBIN.  Each cell is one time-boxed run;
"p50 ms" is the median time of one lease, "cpu ms" the client processes' CPU per lease;
over-leases are counted in process (a proxy handed to a second thread while held) and
checked in the database afterwards (a counter left above zero).

A fleet is many processes, and one Python process is bound by its GIL, so the
"/ procs" rows spread the same 1, 4 and 16 workers over up to 4 processes (16 = 4
processes x 4 threads), each with its own storage object on the same database.

    python benchmarks/bench_sql.py            # full run (~6 minutes)
    python benchmarks/bench_sql.py --quick    # ~2.5 minutes
    python benchmarks/bench_sql.py --duel     # only the 16-worker ratio (~3 minutes)

`--duel` measures pharox and SqlStorage (acquire_lease) at 16 workers in alternation,
`--reps` times, threads and processes, and prints medians: on a shared machine two
cells minutes apart see different loads, so only interleaved runs make a fair ratio.

Each run works in throw-away schemas/databases, dropped at the end.  Never a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import sqlalchemy as sa
from pharox import (
    HealthCheckResult,
    IStorage,
    Lease,
    Proxy,
    ProxyManager,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pharox_integrations.storage.sql import SqlStorage, init_schema

POSTGRES_URL = os.environ.get(
    "PHAROX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("PHAROX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
POOL = "bench"
RR = SelectorStrategy.ROUND_ROBIN


@dataclass
class Cell:
    leases: int = 0
    empty: int = 0  # acquire found no free proxy (pool exhausted): retried
    races: int = 0  # ProxyUnavailableError from create_lease: retried
    errors: int = 0  # anything else
    over: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # process CPU seconds (client side) spent in the cell
    samples: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.leases / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.cpu / self.leases * 1000 if self.leases else float("nan")

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.samples) * 1000 if self.samples else float("nan")


def run_cell(storage: IStorage, workers: int, seconds: float, one_txn: bool) -> Cell:
    manager = ProxyManager(storage)
    cell = Cell()
    held: set[uuid.UUID] = set()
    lock = threading.Lock()
    start = threading.Barrier(workers + 1)
    stop_at = [0.0]

    def acquire() -> Lease | None:
        if one_txn:
            assert isinstance(storage, SqlStorage)
            return storage.acquire_lease(POOL, "bench", 60, selector=RR)
        return manager.acquire_proxy(POOL, "bench", 60, selector=RR)

    def work() -> None:
        local = Cell()
        backoff = 0.002
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                lease = acquire()
            except ProxyUnavailableError:
                local.races += 1
                continue
            except Exception:
                local.errors += 1
                time.sleep(0.01)
                continue
            if lease is None:  # pool exhausted: back off like the broker does
                local.empty += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.05)
                continue
            backoff = 0.002
            with lock:
                if lease.proxy_id in held:
                    local.over += 1
                held.add(lease.proxy_id)
            try:
                storage.apply_health_check_result(
                    HealthCheckResult(
                        proxy_id=lease.proxy_id,
                        status=ProxyStatus.ACTIVE,
                        latency_ms=42,
                        protocol=ProxyProtocol.HTTP,
                        status_code=200,
                    )
                )
            except Exception:
                local.errors += 1
            with lock:
                held.discard(lease.proxy_id)
            try:
                manager.release_proxy(lease)
            except Exception:
                local.errors += 1
                continue
            local.leases += 1
            local.samples.append(time.perf_counter() - t0)
        with lock:
            cell.leases += local.leases
            cell.empty += local.empty
            cell.races += local.races
            cell.errors += local.errors
            cell.over += local.over
            cell.samples.extend(local.samples)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    cpu0 = time.process_time()
    stop_at[0] = began + seconds
    start.wait()
    for t in threads:
        t.join()
    cell.seconds = time.perf_counter() - began
    cell.cpu = time.process_time() - cpu0
    return cell


MAX_PROCS = 4


def _open_for_child(kind: str, url: str) -> tuple[IStorage, Callable[[], None]]:
    if kind == "pharox":
        from pharox.storage.postgres import PostgresStorage

        engine = sa.create_engine(url, pool_size=20, max_overflow=20)
        return PostgresStorage(engine), engine.dispose
    storage = SqlStorage(url, pool_size=20)
    return storage, storage.close


def _child(kind: str, url: str, threads: int, seconds: float, one_txn: bool, ready: Any, out: Any) -> None:
    """One process of a multi-process cell: its own storage, `threads` workers."""
    storage, close = _open_for_child(kind, url)
    try:
        storage.get_pool_stats(POOL)  # connect and warm the caches before the clock starts
        ready.wait()
        cell = run_cell(storage, threads, seconds, one_txn)
        out.put((cell.leases, cell.empty, cell.races, cell.errors, cell.over, cell.seconds, cell.cpu, cell.samples))
    finally:
        close()


def run_cell_procs(kind: str, url: str, workers: int, seconds: float, one_txn: bool) -> Cell:
    """`workers` threads spread over up to MAX_PROCS processes sharing one database."""
    procs = min(workers, MAX_PROCS)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(kind, url, workers // procs, seconds, one_txn, ready, out))
        for _ in range(procs)
    ]
    for child in children:
        child.start()
    ready.wait(timeout=120)
    cell = Cell()
    for _ in children:
        leases, empty, races, errors, over, secs, cpu, samples = out.get(timeout=seconds + 120)
        cell.leases += leases
        cell.empty += empty
        cell.races += races
        cell.errors += errors
        cell.over += over
        cell.seconds = max(cell.seconds, secs)
        cell.cpu += cpu
        cell.samples.extend(samples)
    for child in children:
        child.join(timeout=30)
    return cell


def seed(storage: IStorage, size: int) -> ProxyPool:
    pool = ProxyPool(name=POOL)
    storage.save_pool(pool)
    proxies = [
            Proxy(
                host=f"127.{i // 65000}.{(i // 250) % 250}.{i % 250 + 1}",
                port=3128,
                protocol=ProxyProtocol.HTTP,
                pool_id=pool.id,
                status=ProxyStatus.ACTIVE,
                max_concurrency=1,
            )
            for i in range(size)
    ]
    for start in range(0, size, 1000):  # pharox's bulk insert is one statement
        storage.add_proxies_bulk(proxies[start : start + 1000])
    return pool


def db_over_leased(engine: sa.Engine, table: str) -> int:
    """Proxies whose counter is above their limit, or left leased (should be 0)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(f"SELECT count(*) FROM {table} WHERE current_leases <> 0")
            ).scalar_one()
        )


# ----------------------------------------------------------------- databases


@contextmanager
def pg_schema() -> Iterator[str]:
    name = f"pxi_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()


@contextmanager
def mysql_db() -> Iterator[str]:
    name = f"pxi_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(MYSQL_URL)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
    try:
        yield sa.make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE `{name}`")
        admin.dispose()


@contextmanager
def sqlite_file() -> Iterator[str]:
    with TemporaryDirectory() as tmp:
        yield f"sqlite:///{tmp}/bench.db"


@contextmanager
def sql_storage(kind: str, size: int) -> Iterator[tuple[SqlStorage, str]]:
    opener = {"postgres": pg_schema, "mysql": mysql_db, "sqlite": sqlite_file}[kind]
    with opener() as url:
        init_schema(url)
        storage = SqlStorage(url, pool_size=20)
        seed(storage, size)
        try:
            yield storage, "pxi_proxies", url
        finally:
            storage.close()


@contextmanager
def pharox_storage(size: int) -> Iterator[tuple[IStorage, str]]:
    from pharox.storage.postgres import PostgresStorage
    from pharox.storage.postgres.tables import metadata

    with pg_schema() as url:
        engine = sa.create_engine(url, pool_size=20, max_overflow=20)
        metadata.create_all(engine)
        storage = PostgresStorage(engine)
        seed(storage, size)
        try:
            yield storage, "proxy", url
        finally:
            engine.dispose()


# ----------------------------------------------------------------- history


def add_history(storage: IStorage, rows: int, pharox: bool) -> None:
    """Bulk-insert `rows` released leases (one statement, server side)."""
    engine: sa.Engine = storage.engine if isinstance(storage, SqlStorage) else storage._engine  # type: ignore[attr-defined]
    table, pool_name = ("lease", ", 'bench'") if pharox else ("pxi_leases", "")
    proxy_table = "proxy" if pharox else "pxi_proxies"
    consumer_table = "consumer" if pharox else "pxi_consumers"
    pool_cols = ", pool_name" if pharox else ""
    now = "now()" if pharox else "(now() AT TIME ZONE 'utc')"  # ours: naive UTC columns
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {consumer_table} (id, name) VALUES (gen_random_uuid(), 'history')"
            " ON CONFLICT DO NOTHING"
        )
        conn.exec_driver_sql(
            f"""
            WITH px AS (SELECT id, pool_id, row_number() OVER (ORDER BY id) - 1 AS n
                        FROM {proxy_table})
            INSERT INTO {table} (id, proxy_id, pool_id, consumer_id{pool_cols}, status,
                                 acquired_at, expires_at, released_at)
            SELECT gen_random_uuid(), px.id, px.pool_id,
                   (SELECT id FROM {consumer_table} WHERE name = 'history'){pool_name},
                   'released', {now} - make_interval(secs => g),
                   {now} - make_interval(secs => g) + interval '60 seconds',
                   {now} - make_interval(secs => g) + interval '1 second'
            FROM generate_series(1, {rows}) AS g
            JOIN px ON px.n = mod(g, (SELECT count(*) FROM px))
            """
        )
        conn.exec_driver_sql(f"ANALYZE {table}")


# ----------------------------------------------------------------- main


def fmt(label: str, size: int, workers: int, cell: Cell) -> str:
    return (
        f"| {label:<30} | {size:>6} | {workers:>2} | {cell.rate:>9.0f} | {cell.p50_ms:>7.2f} |"
        f" {cell.cpu_ms:>6.2f} |"
        f" {cell.leases:>6} | {cell.races:>5} | {cell.empty:>6} | {cell.errors:>3} | {cell.over:>4} |"
    )


HEADER = (
    "| storage / path                 |   pool |  w |  leases/s |  p50 ms | cpu ms |"
    "  leases | races |  empty | err | over |\n"
    "|--------------------------------|-------:|---:|----------:|--------:|-------:|"
    "--------:|------:|-------:|----:|-----:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter cells, fewer rows")
    parser.add_argument("--skip-history", action="store_true")
    parser.add_argument("--skip-table", action="store_true", help="only the history part")
    parser.add_argument("--only", default="", help="run only rows whose label contains this")
    parser.add_argument("--duel", action="store_true", help="only the interleaved 16-worker ratio")
    parser.add_argument("--reps", type=int, default=3, help="interleaved runs per --duel cell")
    args = parser.parse_args()
    if args.duel:
        duel(1.0 if args.quick else 2.5, args.reps)
        return
    seconds = 1.0 if args.quick else 2.5
    sizes = (10, 10_000)
    workers_list = (1, 4, 16)

    print(
        f"cell = {seconds} s, one run each; max_concurrency=1; ROUND_ROBIN; "
        f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print(HEADER)
    # (label, storage kind, opener, one transaction, workers spread over processes)
    plans: list[tuple[str, str, Callable[[int], Any], bool, bool]] = [
        ("pharox PostgresStorage", "pharox", pharox_storage, False, False),
        ("pharox PostgresStorage / procs", "pharox", pharox_storage, False, True),
        ("SqlStorage pg / manager", "postgres", lambda n: sql_storage("postgres", n), False, False),
        ("SqlStorage pg / acquire_lease", "postgres", lambda n: sql_storage("postgres", n), True, False),
        ("SqlStorage pg / acq_lease/procs", "postgres", lambda n: sql_storage("postgres", n), True, True),
        ("SqlStorage sqlite / manager", "sqlite", lambda n: sql_storage("sqlite", n), False, False),
        ("SqlStorage sqlite / acq_lease", "sqlite", lambda n: sql_storage("sqlite", n), True, False),
        ("SqlStorage sqlite / acq/procs", "sqlite", lambda n: sql_storage("sqlite", n), True, True),
        ("SqlStorage mariadb / manager", "mysql", lambda n: sql_storage("mysql", n), False, False),
        ("SqlStorage mariadb / acq_lease", "mysql", lambda n: sql_storage("mysql", n), True, False),
    ]
    rates: dict[tuple[str, int, int], float] = {}
    for label, kind, opener, one_txn, procs in plans:
        if args.only not in label or args.skip_table:
            continue
        for size in sizes:
            with opener(size) as (storage, table, url):
                for workers in workers_list:
                    if procs:
                        cell = run_cell_procs(kind, url, workers, seconds, one_txn)
                    else:
                        cell = run_cell(storage, workers, seconds, one_txn)
                    if isinstance(storage, SqlStorage):
                        storage.cleanup_expired_leases(force=True)
                        engine = storage.engine
                    else:
                        engine = storage._engine
                    cell.over += db_over_leased(engine, table)
                    print(fmt(label, size, workers, cell), flush=True)
                    rates[(label, size, workers)] = cell.rate

    for size in sizes:
        for ours, theirs, how in (
            ("SqlStorage pg / acquire_lease", "pharox PostgresStorage", "threads in one process"),
            ("SqlStorage pg / acq_lease/procs", "pharox PostgresStorage / procs", f"over {MAX_PROCS} processes"),
        ):
            a, b = rates.get((ours, size, 16)), rates.get((theirs, size, 16))
            if a and b:
                print(f"pool {size:>6}, 16 workers {how}: SqlStorage acquire_lease = {a / b:.1f}x pharox")

    if args.skip_history:
        return
    print(f"\n(load average now {os.getloadavg()[0]:.1f})")
    history(2.0 if not args.quick else 1.0, args.only, reps=5 if not args.quick else 3)


def duel(seconds: float, reps: int) -> None:
    """pharox vs SqlStorage.acquire_lease at 16 workers, interleaved; medians."""
    print(
        f"16 workers, cell = {seconds} s, median of {reps} interleaved runs; threads = one process, "
        f"procs = {MAX_PROCS} processes x {16 // MAX_PROCS} threads; "
        f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| pool   | workers as | pharox leases/s | SqlStorage leases/s | ratio | pharox cpu ms | ours cpu ms |")
    print("|-------:|------------|----------------:|--------------------:|------:|--------------:|------------:|")
    for size in (10, 10_000):
        with pharox_storage(size) as (theirs, t_table, t_url), sql_storage("postgres", size) as (ours, o_table, o_url):
            for procs in (False, True):
                cells: dict[str, list[Cell]] = {"pharox": [], "ours": []}
                for _ in range(reps):
                    for name, storage, url, one_txn in (
                        ("pharox", theirs, t_url, False),
                        ("ours", ours, o_url, True),
                    ):
                        kind = "pharox" if name == "pharox" else "postgres"
                        if procs:
                            cell = run_cell_procs(kind, url, 16, seconds, one_txn)
                        else:
                            cell = run_cell(storage, 16, seconds, one_txn)
                        if isinstance(storage, SqlStorage):
                            storage.cleanup_expired_leases(force=True)
                        cell.over += db_over_leased(
                            storage.engine if isinstance(storage, SqlStorage) else storage._engine,  # type: ignore[attr-defined]
                            o_table if name == "ours" else t_table,
                        )
                        assert cell.over == 0 and cell.errors == 0, (name, cell)
                        cells[name].append(cell)
                a = statistics.median(c.rate for c in cells["pharox"])
                b = statistics.median(c.rate for c in cells["ours"])
                ca = statistics.median(c.cpu_ms for c in cells["pharox"])
                cb = statistics.median(c.cpu_ms for c in cells["ours"])
                how = "procs" if procs else "threads"
                row = f"| {size:>6} | {how:<10} | {a:>15.0f} | {b:>19.0f} | {b / a:>5.1f} | {ca:>13.2f} | {cb:>11.2f} |"
                print(row, flush=True)
    print(f"\n(load average at the end {os.getloadavg()[0]:.1f})")


def history(seconds: float, only: str, reps: int) -> None:
    """Cost per lease with 0 / 100k / 1M old lease rows, one worker, pool of 10.

    The three databases are built first and then measured in turns, `reps` times,
    so a busy moment on the shared machine hits all three alike; medians reported.
    """
    steps = (0, 100_000, 1_000_000)
    print("\nCost per lease with old (released) lease rows, PostgreSQL, pool of 10, 1 worker,")
    print(f"median of {reps} interleaved runs:\n")
    print("| storage / path                 | history | leases/s | p50 ms | cpu ms | p50 vs 0 |")
    print("|--------------------------------|--------:|---------:|-------:|-------:|---------:|")
    families: list[tuple[str, Callable[[int], Any], list[tuple[str, bool]]]] = [
        (
            "sql",
            lambda n: sql_storage("postgres", n),
            [("SqlStorage pg / manager", False), ("SqlStorage pg / acquire_lease", True)],
        ),
        ("pharox", pharox_storage, [("pharox PostgresStorage", False)]),
    ]
    for family, opener, paths in families:
        paths = [(label, one) for label, one in paths if only in label]
        if not paths:
            continue
        with ExitStack() as stack:
            stores = []
            for rows in steps:
                storage, _table, _url = stack.enter_context(opener(10))
                if rows:
                    add_history(storage, rows, family == "pharox")
                stores.append(storage)
            for label, one_txn in paths:
                cells: dict[int, list[Cell]] = {rows: [] for rows in steps}
                for _ in range(reps):
                    for rows, storage in zip(steps, stores, strict=True):
                        cells[rows].append(run_cell(storage, 1, seconds, one_txn))
                base = statistics.median(c.p50_ms for c in cells[0])
                for rows in steps:
                    p50 = statistics.median(c.p50_ms for c in cells[rows])
                    rate = statistics.median(c.rate for c in cells[rows])
                    cpu = statistics.median(c.cpu_ms for c in cells[rows])
                    print(
                        f"| {label:<30} | {rows:>7} | {rate:>8.0f} | {p50:>6.2f} | {cpu:>6.2f} |"
                        f" {p50 / base:>8.2f} |",
                        flush=True,
                    )
    print(f"\n(load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
