"""A fleet of Scrapy crawlers on one shared pool: pages/s per storage, and database transactions per page.

    python benchmarks/bench_fleet.py            # 1,500 pages per process, median of 3 runs per cell
    python benchmarks/bench_fleet.py --quick    # 300 pages per process, 1 run per cell
    python benchmarks/bench_fleet.py --per-request  # the SQL rows with PHAROX_LEASE_BLOCKS off

Diagnosis aids (environment variables of a run): PXI_BENCH_COUNT=1 prints, per crawler,
its storage calls by method, the broker's and blocks' counters and the garbage
collector's runs and milliseconds by generation (between go and stop);
PXI_BENCH_PROFILE=DIR saves a yappi CPU profile of every thread per crawler (pip install
yappi); PXI_BENCH_NO_FREEZE=1 runs the crawlers with PHAROX_GC_FREEZE off, so the
collector walks the objects made at start-up on every full collection, as before the
middleware froze them; PXI_BENCH_STALL=SECONDS stalls each crawler's event loop once,
a quarter into its pages (a slow callback, a long collection), to show how the crawl's
pace depends on the rhythm of its loop (see docs/benchmarks.md).  With PXI_BENCH_COUNT
the loop's turns and the callbacks they ran are counted too.

The measurement issue 18 asks for.  Table 1, for K = 1 and 4 crawler processes running
at once, each crawling `--pages` pages (CONCURRENT_REQUESTS=32 and _PER_DOMAIN=32, no
delays, cookies off) through `PharoxProxyMiddleware`.  The spider crawls as a crawl that
follows its links does (`--feed frontier`, the default): start() yields 64 requests and
every page yields the next, so the downloader always has 32 requests to send.  (Fed only
from start(), `--feed start`, Scrapy reads start() one request per engine turn, and how
many requests are in flight then depends on the crawler's pace: the memory and static
crawlers ran with 4 in flight on average (10 at most), the SQL ones with 31, so the rows
did not measure the same crawl.  The "in flight" column shows it.)  The rows:

- static:     no middleware, the spider sets `meta["proxy"]` to one entry (reference);
- memory:     `PHAROX_PROXIES_FILE` with the 100 entries, memory storage: K processes
              means K independent in-memory pools, one per process;
- sqlite / postgresql / mariadb: the K processes share ONE pool (one `PHAROX_STORAGE_URL`,
              one `PHAROX_POOL`), seeded with the same 100 entries by this script
              before the crawl and deleted after it (a fresh pool name per run).

The 100 entries all point at one local pproxy (the test kit's launcher), told apart by
user name (``http://u<i>:p<i>@127.0.0.1:<port>``); the target is the minimal keep-alive
server of `loopback.py`.  Each crawler is its own Python process.  The children start,
open their spider (the middleware and its storage are built), say they are ready and
wait; the clock starts when all are ready and this script says go, and stops when the
last child's Scrapy engine has stopped (the middleware's close included).  pages/s =
all pages of the K processes / that window.

Database transactions per page: PostgreSQL's `pg_stat_database` (xact_commit +
xact_rollback of the database in the URL) read before go and after every child has
exited (a backend flushes its counters when it exits), divided by the pages.  The
counters are per database, so another client busy on the same database during the
window inflates them: the script watches `pg_stat_activity` meanwhile (the children's
connections carry `application_name=pxi-bench-fleet`) and marks such a figure with `*`.
The few transactions each child runs while starting up may land in the window too.
MariaDB: `SHOW GLOBAL STATUS` Com_commit (and Questions, statements) per page, around
the same window; server-wide counters, so anything else on the server counts too.
Com_rollback is left out: PyMySQL sends a ROLLBACK each time SQLAlchemy takes a
connection back, where psycopg sends nothing outside a transaction.

Table 2: the requests and httpx doors over the same kind of pool, one process:
`pharox_session(broker)` shared by 8 threads and `AsyncPharoxTransport(broker)` with 20
requests in flight, memory vs SQLite vs PostgreSQL, `--requests` GETs after a warm-up of
100 (timed inside the child, so start-up is not counted).

Rows take turns within each repeat, so a busy moment on this shared machine hits every
row alike; medians of `--repeats` runs are printed.  Traffic goes to 127.0.0.1 only; every
process started here is stopped before the script ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback import entries, start_pproxy, start_target  # noqa: E402

POSTGRES_URL = os.environ.get("PHAROX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("PHAROX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
APP = "pxi-bench-fleet"  # application_name of the children's PostgreSQL connections
POOL_SIZE = 100
STORAGES = ("static", "memory", "sqlite", "postgresql", "mariadb")
DOOR_STORAGES = ("memory", "sqlite", "postgresql")
PAGE = b"<!DOCTYPE html><html><head><title>page</title></head><body><h1>page</h1><p>ok</p></body></html>"


# ============================================================================ children


BLOCKS = True  # PHAROX_LEASE_BLOCKS (the default); --per-request turns it off
FEED = "frontier"  # how the spider's requests come: --feed
CONCURRENCY = 32  # CONCURRENT_REQUESTS (and _PER_DOMAIN)


def crawl_child(spec: dict[str, Any]) -> None:
    """One crawler process: set up, say ready, wait for go, crawl, print one JSON line."""
    import asyncio

    from scrapy import Request, Spider, signals
    from scrapy.crawler import CrawlerProcess

    pages, target, go_file = spec["pages"], spec["target"], Path(spec["go"])
    stall = float(os.environ.get("PXI_BENCH_STALL") or 0)
    marks: dict[str, float] = {}

    frontier = spec.get("feed", "frontier") == "frontier"
    inflight = [0, 0]  # requests in the downloader, summed over the pages / the most

    class Fleet(Spider):
        name = "fleet"
        seen = 0
        issued = 0

        def page(self, meta: dict[str, Any]) -> Request:
            type(self).issued += 1
            return Request(f"{target}/page/{self.issued - 1}", meta=dict(meta), dont_filter=True)

        async def start(self) -> Any:
            deadline = time.monotonic() + 300  # the parent died: do not wait forever
            while not go_file.exists():
                if time.monotonic() > deadline:
                    raise SystemExit("no go")
                await asyncio.sleep(0.002)
            marks["go_seen"] = time.time()
            marks["cpu_go"] = time.process_time()
            # frontier: a crawl's own links keep 2 x CONCURRENT_REQUESTS requests waiting,
            # each page yields the next; start: every request from start(), which Scrapy
            # reads one per engine turn (then far fewer than 32 may be in flight).
            for _ in range(min(pages, 2 * CONCURRENCY) if frontier else pages):
                yield self.page(self.meta)

        meta: dict[str, Any] = {"proxy": spec["static"]} if spec.get("static") else {}

        def parse(self, response: Any) -> Any:
            type(self).seen += 1
            active = len(crawler.engine.downloader.active) if crawler.engine else 0
            inflight[0] += active
            inflight[1] = max(inflight[1], active)
            if stall and type(self).seen == pages // 4:  # diagnosis: one stall of the loop
                time.sleep(stall)
            marks["last_page"] = time.time()
            marks.setdefault("first_page", marks["last_page"])
            if frontier and self.issued < pages:
                yield self.page(self.meta)

    settings: dict[str, Any] = {
        "CONCURRENT_REQUESTS": CONCURRENCY,
        "CONCURRENT_REQUESTS_PER_DOMAIN": CONCURRENCY,
        "DOWNLOAD_DELAY": 0,
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        "ROBOTSTXT_OBEY": False,
        "LOG_LEVEL": "ERROR",
    }
    if not spec.get("static"):
        settings["DOWNLOADER_MIDDLEWARES"] = {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610}
        settings["PHAROX_LOGSTATS_INTERVAL"] = 0
        if os.environ.get("PXI_BENCH_NO_FREEZE"):  # diagnosis: the collector walks the start-up heap
            settings["PHAROX_GC_FREEZE"] = False
        if spec.get("entries_file"):
            settings["PHAROX_PROXIES_FILE"] = spec["entries_file"]
        else:
            settings["PHAROX_STORAGE_URL"] = spec["storage_url"]
            settings["PHAROX_POOL"] = spec["pool"]
            settings["PHAROX_LEASE_BLOCKS"] = bool(spec.get("blocks"))
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(Fleet)

    def opened() -> None:
        Path(spec["ready"]).write_text("ready")

    def stopped() -> None:
        marks["stopped"] = time.time()
        marks["cpu_stopped"] = time.process_time()
        if calls is not None:  # PXI_BENCH_COUNT: the broker's and its blocks' counters too
            assert crawler.engine is not None
            for mw in crawler.engine.downloader.middleware.middlewares:
                broker = getattr(mw, "broker", None)
                if broker is not None:
                    calls.update({f"broker.{k}": v for k, v in broker.counters.items() if v})
                    calls["broker.peak_held"] = broker.peak_held  # the crawl's real concurrency
                    import gc

                    calls["gc.objects"] = len(gc.get_objects())  # what a full collection walks
                    for block in broker._selection.blocks():
                        calls.update({f"block.{k}": v for k, v in block.counters.items()})

    crawler.signals.connect(opened, signal=signals.spider_opened)
    crawler.signals.connect(stopped, signal=signals.engine_stopped)
    calls = (
        _count_storage_calls(lambda: "cpu_go" in marks and "cpu_stopped" not in marks)
        if os.environ.get("PXI_BENCH_COUNT")
        else None
    )
    process.crawl(crawler)
    profile_to = os.environ.get("PXI_BENCH_PROFILE")  # a directory: one profile per crawler
    if profile_to:  # every thread's CPU time, by function (yappi: pip install yappi)
        import yappi

        yappi.set_clock_type("cpu")
        yappi.start()
        process.start()
        yappi.stop()
        yappi.get_func_stats().save(f"{profile_to}/{os.getpid()}.prof", type="pstat")
        with open(f"{profile_to}/{os.getpid()}.threads", "w") as out:
            yappi.get_thread_stats().print_all(out=out)
    else:
        process.start()
    assert crawler.stats is not None
    stats = crawler.stats.get_stats()
    print(
        json.dumps(
            {
                "pages": Fleet.seen,
                "inflight_mean": inflight[0] / max(1, Fleet.seen),
                "inflight_max": inflight[1],
                "errors": stats.get("log_count/ERROR", 0),
                "exceptions": stats.get("downloader/exception_count", 0),
                **({"storage_calls": calls} if calls is not None else {}),
                **marks,
            }
        ),
        flush=True,
    )


def _count_storage_calls(window: Callable[[], bool]) -> dict[str, int]:
    """Debug aid (PXI_BENCH_COUNT=1): count the SQL storages' and site stores' calls by
    method, in every thread, into the dict returned (printed in the child's JSON line),
    and the garbage collector's runs and milliseconds by generation while `window()`."""
    import functools
    import gc

    calls: dict[str, int] = {}
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if not window():
            started.clear()
        elif phase == "start":
            started.append(time.process_time())
        elif started:
            key = f"gc.gen{info['generation']}"
            calls[key] = calls.get(key, 0) + 1
            calls[key + ".ms"] = calls.get(key + ".ms", 0) + round((time.process_time() - started.pop()) * 1000)

    gc.callbacks.append(on_gc)

    import asyncio.base_events

    turn = asyncio.base_events.BaseEventLoop._run_once

    def counted_turn(loop: Any) -> None:  # the loop's turns, and the callbacks each ran
        if window():
            calls["loop.turns"] = calls.get("loop.turns", 0) + 1
            calls["loop.callbacks"] = calls.get("loop.callbacks", 0) + len(loop._ready)
        turn(loop)

    asyncio.base_events.BaseEventLoop._run_once = counted_turn  # type: ignore[method-assign]

    from pharox_integrations.storage.sql import SqlStorage
    from pharox_integrations.storage.sql_sites import SqlSiteStore

    for cls in (SqlStorage, SqlSiteStore):
        for name, fn in list(vars(cls).items()):
            if name.startswith("_") or not callable(fn):
                continue

            def counted(*args: Any, _fn: Any = fn, _key: str = f"{cls.__name__}.{name}", **kwargs: Any) -> Any:
                calls[_key] = calls.get(_key, 0) + 1
                return _fn(*args, **kwargs)

            setattr(cls, name, functools.wraps(fn)(counted))
    return calls


def door_child(spec: dict[str, Any]) -> None:
    """One door run in its own process: warm up, then time `total` GETs; print one JSON line."""
    import logging

    from pharox_integrations import LeaseBroker

    logging.basicConfig(level=logging.WARNING)
    if spec["storage_url"] == "memory://":
        broker = LeaseBroker.from_proxies(spec["entries"])
    else:
        broker = LeaseBroker.from_settings(
            {
                "PHAROX_STORAGE_URL": spec["storage_url"],
                "PHAROX_POOL": spec["pool"],
                "PHAROX_LEASE_BLOCKS": bool(spec.get("blocks")),
            }
        )
    url, total = spec["target"] + "/", spec["total"]
    if spec["door"] == "requests":
        from pharox_integrations.requests import pharox_session

        session = pharox_session(broker)
        failures: list[str] = []

        def run(n: int, threads: int = 8) -> float:
            per = n // threads

            def work() -> None:
                for _ in range(per):
                    try:
                        status = session.get(url, timeout=30).status_code
                    except Exception as exc:
                        failures.append(f"{type(exc).__name__}: {exc}"[:200])
                        continue
                    if status != 200:
                        failures.append(str(status))

            pool = [threading.Thread(target=work) for _ in range(threads)]
            start = time.perf_counter()
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            return per * threads / (time.perf_counter() - start)

        run(100)
        failures.clear()
        rate = run(total)
        session.close()
    else:
        import asyncio

        import httpx

        from pharox_integrations.httpx import AsyncPharoxTransport

        failures = []

        async def arun(client: httpx.AsyncClient, n: int, concurrency: int = 20) -> float:
            remaining = iter(range(n))

            async def worker() -> None:
                for _ in remaining:
                    try:
                        status = (await client.get(url)).status_code
                    except Exception as exc:
                        failures.append(f"{type(exc).__name__}: {exc}"[:200])
                        continue
                    if status != 200:
                        failures.append(str(status))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return n / (time.perf_counter() - start)

        async def amain() -> float:
            async with httpx.AsyncClient(transport=AsyncPharoxTransport(broker), timeout=30) as client:
                await arun(client, 100)
                failures.clear()
                return await arun(client, total)

        rate = asyncio.run(amain())
    held = broker.held
    broker.close()
    print(json.dumps({"rate": rate, "failures": len(failures), "first": failures[:2], "held": held}), flush=True)


# ============================================================================ databases


def pg_counters() -> int:
    """xact_commit + xact_rollback of the benchmark's PostgreSQL database."""
    return _pg_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
        (_pg_dbname(),),
    )


def _pg_dbname() -> str:
    import sqlalchemy as sa

    return str(sa.make_url(POSTGRES_URL).database)


def _pg_admin() -> Any:
    """A psycopg connection to the `postgres` database (autocommit): what it runs is not
    counted in the benchmark database's statistics."""
    import psycopg
    import sqlalchemy as sa

    url = sa.make_url(POSTGRES_URL)
    return psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname="postgres",
        autocommit=True,
    )


def _pg_scalar(sql: str, params: tuple[Any, ...]) -> int:
    with _pg_admin() as conn:
        row = conn.execute(sql, params).fetchone()
        return int(row[0]) if row and row[0] is not None else 0


def pg_settled_counters() -> int:
    """The counters once the exited children's backends have flushed theirs (stable twice)."""
    last, stable = -1, 0
    for _ in range(40):
        now = pg_counters()
        stable = stable + 1 if now == last else 0
        if stable >= 2:
            break
        last = now
        time.sleep(0.1)
    return last


class PgWatch:
    """Other clients busy on the benchmark database while a crawl runs (their
    transactions would be counted with ours)."""

    def __init__(self) -> None:
        self.others: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._since = time.time()

    def __enter__(self) -> PgWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with suppress(Exception), _pg_admin() as conn:
            own = conn.info.backend_pid
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> %s"
                    " AND coalesce(application_name, '') <> %s AND backend_type = 'client backend'"
                    " AND (state <> 'idle' OR state_change >= to_timestamp(%s))",
                    (_pg_dbname(), own, APP, self._since),
                ).fetchall()
                self.others.update(int(r[0]) for r in rows)
                self._stop.wait(0.2)


def mysql_counters() -> tuple[int, int]:
    """(Com_commit, Questions), server-wide.  Com_rollback is left out: PyMySQL sends a
    ROLLBACK whenever SQLAlchemy gives a connection back, transaction or not (psycopg
    sends nothing when no transaction is open), so it would not compare with PostgreSQL."""
    import sqlalchemy as sa

    engine = sa.create_engine(MYSQL_URL)
    try:
        with engine.connect() as conn:
            rows: dict[str, str] = dict(
                conn.exec_driver_sql("SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit', 'Questions')").all()
            )
    finally:
        engine.dispose()
    return int(rows["Com_commit"]), int(rows["Questions"])


def with_app_name(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).update_query_dict({"application_name": APP}).render_as_string(hide_password=False)


@contextmanager
def fresh_pool(url: str, port: int) -> Iterator[str]:
    """A pool of POOL_SIZE entries under a new name in the storage at `url`; deleted after."""
    from pharox_integrations import LeaseBroker
    from pharox_integrations.storage.sql import SqlStorage

    name = f"bench-fleet-{uuid.uuid4().hex[:8]}"
    storage = SqlStorage(url, pool_size=2)
    try:
        broker = LeaseBroker.from_proxies(entries(port, POOL_SIZE), pool=name, storage=storage)
        broker.close()
        yield name
    finally:
        with suppress(Exception):
            record = storage.get_pool_by_name(name)
            if record is not None:
                storage.delete_pool(str(record.id))
        storage.close()


# ============================================================================ running children


def _child_argv(kind: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, __file__, "--child", kind, json.dumps(spec)]


LIVE: set[subprocess.Popen[bytes]] = set()  # children to stop if this script is interrupted


def _spawn(kind: str, spec: dict[str, Any], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        proc = subprocess.Popen(_child_argv(kind, spec), stdout=stdout, stderr=stderr, cwd=ROOT)
    LIVE.add(proc)
    return proc


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9
    finally:
        LIVE.discard(proc)


def _result(out: Path) -> dict[str, Any] | None:
    lines = out.read_text(errors="replace").strip().splitlines() if out.exists() else []
    with suppress(ValueError, IndexError):
        return dict(json.loads(lines[-1]))
    return None


def _why(out: Path) -> str:
    err = out.with_suffix(".err")
    text = err.read_text(errors="replace").strip() if err.exists() else ""
    return text[-600:] or "(no output)"


@dataclass
class Crawl:
    rate: float = 0.0
    lost: int = 0  # pages asked for and not scraped
    errors: int = 0  # Scrapy ERROR log lines + downloader exceptions
    tx: float | None = None  # transactions per page
    stmts: float | None = None  # statements per page (MariaDB)
    busy_db: bool = False  # another client was busy on the database meanwhile
    cpu_ms: float | None = None  # the crawler processes' CPU time per page (all threads)
    inflight: float | None = None  # requests in the downloader when a page came back (mean)
    edges: str = ""  # go -> first page, last page -> engine stopped (slowest child), for the run's line
    failed: str = ""


def run_crawl(storage: str, k: int, pages: int, target: str, port: int, work: Path, urls: dict[str, str]) -> Crawl:
    """K crawler processes at once; one Crawl."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    go = run_dir / "go"
    base: dict[str, Any] = {"pages": pages, "target": target, "go": str(go), "blocks": BLOCKS, "feed": FEED}
    shared = storage not in ("static", "memory")
    with fresh_pool(urls[storage], port) if shared else nullcontext() as pool:
        if storage == "static":
            base["static"] = entries(port, 1)[0]
        elif storage == "memory":
            base["entries_file"] = str(work / "entries.txt")
        else:
            base["storage_url"], base["pool"] = urls[storage], pool
        procs, outs = [], []
        try:
            for i in range(k):
                out = run_dir / f"child{i}.out"
                spec = dict(base, ready=str(run_dir / f"ready{i}"))
                procs.append(_spawn("crawl", spec, out))
                outs.append(out)
            deadline = time.monotonic() + 180
            while not all((run_dir / f"ready{i}").exists() for i in range(k)):
                dead = [i for i, p in enumerate(procs) if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    why = _why(outs[dead[0]]) if dead else "children not ready after 180 s"
                    return Crawl(failed=why)
                time.sleep(0.01)
            before_pg = pg_counters() if storage == "postgresql" else None
            before_my = mysql_counters() if storage == "mariadb" else None
            watch = PgWatch() if storage == "postgresql" else None
            if watch:
                watch.__enter__()
            go_at = time.time()
            tmp = run_dir / "go.tmp"
            tmp.write_text(str(go_at))
            tmp.rename(go)
            codes = [_reap(p, 600) for p in procs]
            if watch:
                watch.__exit__(None)
            results = [_result(out) for out in outs]
            if any(code != 0 for code in codes) or any(r is None for r in results):
                bad = next(i for i, (c, r) in enumerate(zip(codes, results, strict=True)) if c != 0 or r is None)
                return Crawl(failed=f"child exit {codes[bad]}: {_why(outs[bad])}")
            done = [r for r in results if r is not None]
            for r in done:
                if "storage_calls" in r:
                    print(f"    storage calls of one crawler: {r['storage_calls']}", flush=True)
            scraped = sum(int(r["pages"]) for r in done)
            end = max(float(r.get("stopped", r.get("last_page", go_at))) for r in done)
            crawl = Crawl(
                rate=scraped / (end - go_at),
                lost=pages * k - scraped,
                errors=sum(int(r["errors"]) + int(r["exceptions"]) for r in done),
            )
            crawl.inflight = statistics.mean(float(r["inflight_mean"]) for r in done)
            if all("first_page" in r and "stopped" in r for r in done):
                first = max(float(r["first_page"]) for r in done) - go_at
                tail = max(float(r["stopped"]) - float(r["last_page"]) for r in done)
                crawl.edges = f", first page {first * 1000:.0f} ms, close {tail * 1000:.0f} ms"
            if scraped and all("cpu_stopped" in r and "cpu_go" in r for r in done):
                cpu = sum(float(r["cpu_stopped"]) - float(r["cpu_go"]) for r in done)
                crawl.cpu_ms = cpu * 1000 / scraped
            if before_pg is not None and scraped:
                crawl.tx = (pg_settled_counters() - before_pg) / scraped
                crawl.busy_db = bool(watch and watch.others)
            if before_my is not None and scraped:
                time.sleep(0.2)
                after = mysql_counters()
                crawl.tx = (after[0] - before_my[0]) / scraped
                crawl.stmts = (after[1] - before_my[1]) / scraped
            return crawl
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                _reap(p, 10)


@dataclass
class DoorRun:
    rate: float = 0.0
    failures: int = 0
    failed: str = ""


def run_door(door: str, storage: str, total: int, target: str, port: int, work: Path, urls: dict[str, str]) -> DoorRun:
    out = Path(tempfile.mkdtemp(dir=work)) / "door.out"
    spec: dict[str, Any] = {"door": door, "target": target, "total": total, "blocks": BLOCKS}
    with nullcontext() if storage == "memory" else fresh_pool(urls[storage], port) as pool:
        if storage == "memory":
            spec.update(storage_url="memory://", entries=entries(port, POOL_SIZE))
        else:
            spec.update(storage_url=urls[storage], pool=pool)
        proc = _spawn("door", spec, out)
        code = _reap(proc, 300)
    result = _result(out)
    time.sleep(0.3)  # let the proxy and the target drop the closed connections
    if code != 0 or result is None:
        return DoorRun(failed=f"exit {code}: {_why(out)}")
    if result["held"]:
        return DoorRun(failed=f"{result['held']} lease(s) left held")
    return DoorRun(rate=float(result["rate"]), failures=int(result["failures"]))


# ============================================================================ the tables


@dataclass
class Cells:
    runs: dict[Any, list[Any]] = field(default_factory=dict)

    def add(self, key: Any, value: Any) -> None:
        self.runs.setdefault(key, []).append(value)


def _crawl_row(
    k: int, storage: str, rate: str, ratio: str, cpu: str, busy: str, tx: str, stmts: str, lost: object, errors: object
) -> str:
    return (
        f"| {k} | {storage:<10} | {rate:>7} | {ratio:>9} | {cpu:>11} | {busy:>9} | {tx:>10} | {stmts:>10} "
        f"| {lost:>4} | {errors:>6} |"
    )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 pages per process, 1 run per cell")
    parser.add_argument("--pages", type=int, default=None, help="pages per crawler process (default 1500)")
    parser.add_argument("--requests", type=int, default=None, help="GETs per door run (default 1500)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (default 3; --quick 1)")
    parser.add_argument("--processes", default="1,4", help="crawler process counts (default 1,4)")
    parser.add_argument("--storages", default=",".join(STORAGES), help="crawl rows (default: all)")
    parser.add_argument(
        "--per-request",
        action="store_true",
        help="the SQL rows (crawls and doors) without lease blocks: one lease and one release per request",
    )
    parser.add_argument(
        "--feed",
        choices=("frontier", "start"),
        default="frontier",
        help="frontier (default): 64 requests from start(), then each page yields the next, as a crawl "
        "following its links keeps CONCURRENT_REQUESTS busy; start: every request from start()",
    )
    parser.add_argument("--no-doors", action="store_true", help="leave the requests/httpx table out")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global BLOCKS, FEED
    BLOCKS = not args.per_request
    FEED = args.feed
    if args.child:
        kind, spec = args.child
        (crawl_child if kind == "crawl" else door_child)(json.loads(spec))
        return

    pages = args.pages or (300 if args.quick else 1500)
    total = args.requests or (300 if args.quick else 1500)
    repeats = args.repeats or (1 if args.quick else 3)
    ks = [int(x) for x in args.processes.split(",")]
    storages = [s for s in STORAGES if s in args.storages.split(",")]

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    began = time.perf_counter()
    load0 = os.getloadavg()[0]
    target_proc, target = start_target(PAGE, "text/html")
    proxy_proc, port = start_pproxy()
    crawls, doors = Cells(), Cells()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            work = Path(tmp)
            (work / "entries.txt").write_text("\n".join(entries(port, POOL_SIZE)) + "\n")
            urls = {
                "sqlite": f"sqlite:///{work}/fleet.db",
                "postgresql": with_app_name(POSTGRES_URL),
                "mariadb": MYSQL_URL,
            }
            from pharox_integrations.storage.sql import init_schema

            for name in ("sqlite", "postgresql", "mariadb"):
                if name in storages or (not args.no_doors and name in DOOR_STORAGES):
                    init_schema(urls[name])

            for repeat in range(repeats):
                for k in ks:
                    for storage in storages:
                        t0 = time.perf_counter()
                        got = run_crawl(storage, k, pages, target, port, work, urls)
                        crawls.add((k, storage), got)
                        if got.failed:
                            print(f"  run {repeat + 1}: K={k} {storage:<10} FAILED: {got.failed}", flush=True)
                            continue
                        extra = f", {got.tx:.2f} tx/page" if got.tx is not None else ""
                        extra += f", {got.cpu_ms:.2f} CPU ms/page" if got.cpu_ms is not None else ""
                        extra += got.edges
                        print(
                            f"  run {repeat + 1}: K={k} {storage:<10} {got.rate:5.0f} pages/s{extra}"
                            f" (lost {got.lost}, errors {got.errors}; {time.perf_counter() - t0:.0f} s)",
                            flush=True,
                        )
            if not args.no_doors:
                for repeat in range(repeats):
                    for door in ("requests", "httpx"):
                        for storage in DOOR_STORAGES:
                            got_door = run_door(door, storage, total, target, port, work, urls)
                            doors.add((door, storage), got_door)
                            shown = f"FAILED: {got_door.failed}" if got_door.failed else f"{got_door.rate:5.0f} req/s"
                            print(f"  run {repeat + 1}: {door:<8} {storage:<10} {shown}", flush=True)
    finally:
        for proc in list(LIVE):
            with suppress(Exception):
                proc.kill()
                proc.wait(10)
        proxy_proc.kill()
        proxy_proc.wait()
        if target_proc.stdin is not None:
            target_proc.stdin.close()
        try:
            target_proc.wait(10)
        except subprocess.TimeoutExpired:
            target_proc.kill()
            target_proc.wait()

    elapsed = time.perf_counter() - began
    print(
        f"\nCrawl: Scrapy, CONCURRENT_REQUESTS={CONCURRENCY}, fed by {FEED}, {POOL_SIZE}-entry pool on one local "
        f"pproxy, {pages} pages per process, K processes at once; "
        f"SQL rows {'with lease blocks' if BLOCKS else 'per request (no blocks)'}; "
        f"median of {repeats} (load average {load0:.1f} -> "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n"
    )
    print(
        _crawl_row(
            0,
            "storage",
            "pages/s",
            "vs memory",
            "CPU ms/page",
            "in flight",
            "db tx/page",
            "stmts/page",
            "lost",
            "errors",
        ).replace("| 0 |", "| K |")
    )
    print(
        "|--:|------------|--------:|----------:|------------:|----------:|-----------:|-----------:|-----:|-------:|"
    )
    odd: list[str] = []
    for k in ks:
        ok = {s: [c for c in crawls.runs.get((k, s), []) if not c.failed] for s in storages}
        memory = _median([c.rate for c in ok.get("memory", [])])
        for storage in storages:
            got_runs, runs = ok[storage], crawls.runs.get((k, storage), [])
            failed = len(runs) - len(got_runs)
            if failed:
                odd.append(f"K={k} {storage}: {failed} of {len(runs)} runs failed")
            rate = _median([c.rate for c in got_runs])
            if rate is None:
                print(_crawl_row(k, storage, "failed", "-", "-", "-", "-", "-", "-", "-"))
                continue
            ratio = f"{rate / memory:.2f}x" if memory else "-"
            tx = _median([c.tx for c in got_runs if c.tx is not None])
            busy = any(c.busy_db for c in got_runs)
            tx_s = f"{tx:.2f}{'*' if busy else ''}" if tx is not None else "-"
            stmts = _median([c.stmts for c in got_runs if c.stmts is not None])
            stmts_s = f"{stmts:.2f}" if stmts is not None else "-"
            lost, errors = sum(c.lost for c in got_runs), sum(c.errors for c in got_runs)
            cpu = _median([c.cpu_ms for c in got_runs if c.cpu_ms is not None])
            cpu_s = f"{cpu:.2f}" if cpu is not None else "-"
            busy_m = _median([c.inflight for c in got_runs if c.inflight is not None])
            busy_s = f"{busy_m:.1f}" if busy_m is not None else "-"
            print(_crawl_row(k, storage, f"{rate:.0f}", ratio, cpu_s, busy_s, tx_s, stmts_s, lost, errors))
    print(
        "\nmemory with K processes = K independent in-memory pools (one per process); sqlite/postgresql/mariadb = "
        "the K processes share one pool.\npages/s = all K processes' pages / (go -> last engine stopped).  "
        "CPU ms/page: the crawlers' own CPU time (all threads) from go to engine stopped, per page.\n"
        "in flight: requests in Scrapy's downloader when a page came back (mean over the pages).\n"
        "db tx/page: PostgreSQL pg_stat_database xact_commit+xact_rollback of the database;\nMariaDB SHOW GLOBAL "
        "STATUS Com_commit (stmts = Questions), server-wide.  lost/errors: summed over the runs.\n"
        "* = another client was busy on the database during the run: the figure includes its transactions."
    )
    if doors.runs:
        print(
            f"\nDoors: one process, {total} GETs per run after 100 of warm-up, same {POOL_SIZE}-entry pool; "
            f"requests = pharox_session, 8 threads; httpx = AsyncPharoxTransport, 20 in flight; median of {repeats}\n"
        )
        print("| door     | storage    |  req/s | vs memory | failed requests |")
        print("|----------|------------|-------:|----------:|----------------:|")
        for door in ("requests", "httpx"):
            memory = _median([d.rate for d in doors.runs.get((door, "memory"), []) if not d.failed])
            for storage in DOOR_STORAGES:
                runs = doors.runs.get((door, storage), [])
                good = [d for d in runs if not d.failed]
                if len(good) < len(runs):
                    odd.append(f"{door} {storage}: {len(runs) - len(good)} of {len(runs)} runs failed")
                rate = _median([d.rate for d in good])
                rate_s = f"{rate:.0f}" if rate is not None else "failed"
                ratio = f"{rate / memory:.2f}x" if rate is not None and memory else "-"
                print(f"| {door:<8} | {storage:<10} | {rate_s:>6} | {ratio:>9} | {sum(d.failures for d in good):>15} |")
    for line in odd:
        print(f"note: {line}")
    print(f"\n(total time {elapsed:.0f} s)")


if __name__ == "__main__":
    main()
