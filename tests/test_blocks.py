"""Lease blocks (`lease_blocks=True`, PHAROX_LEASE_BLOCKS) on the three SQL databases:
slots lent locally keep `max_concurrency` exact across processes, go back when idle,
share a tight pool between processes, drop a proxy another process benched within about
a second, and come back after `lease_seconds` when their process is killed; an event
loop is lent slots inline.  The storages are real; the last test sends real requests
through a real proxy, the others lease addresses only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from pharox_integrations import LeaseBroker
from pharox_integrations.httpx import AsyncPharoxTransport
from pharox_integrations.storage import storage_from_url

if __package__:
    from .servers import KitProxy, TargetServer
    from .sqlhelpers import backend_params, private_database
else:
    from servers import KitProxy, TargetServer
    from sqlhelpers import backend_params, private_database

PROXIES = [f"http://10.66.0.{i}:3128" for i in range(1, 5)]

# A second process: `threads` threads lease and release for `seconds`, each lease held
# `hold` s and then `hold` s of other work; writes one JSON line per lease: [start, end, host].  With "kill", it leases
# and then waits to be killed.
_CHILD = """
import json, sys, threading, time
from pharox_integrations import LeaseBroker
url, out, mode = sys.argv[1], sys.argv[2], sys.argv[6]
threads, seconds, hold = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
broker = LeaseBroker.from_proxies(
    [], storage=url, acquire_timeout=5, lease_blocks=True, lease_seconds=2
)
if mode == "kill":
    with broker.lease() as lease:
        pass
    print("holding", flush=True)
    time.sleep(60)
rows, lock = [], threading.Lock()
def work():
    end = time.time() + seconds
    while time.time() < end:
        with broker.lease() as lease:
            start = time.time(); time.sleep(hold)
            with lock: rows.append([start, time.time(), lease.host])
        time.sleep(hold)  # the thread's own work between requests: the proxy is not in use
ts = [threading.Thread(target=work) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
broker.close()
with open(out, "w") as f:
    for r in rows: f.write(json.dumps(r) + "\\n")
"""


@pytest.fixture(params=backend_params())
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with private_database(request.param, tmp_path) as made:
        storage_from_url(made, create_schema=True).close()  # type: ignore[attr-defined]
        yield made


def seed(url: str, max_concurrency: int | None = None, n: int = 4) -> None:
    broker = LeaseBroker.from_proxies(PROXIES[:n], storage=url, max_concurrency=max_concurrency)
    broker.storage.close()  # type: ignore[attr-defined]


def blocked(url: str, **kw: object) -> LeaseBroker:
    kw.setdefault("acquire_timeout", 5)
    return LeaseBroker.from_proxies([], storage=url, lease_blocks=True, **kw)  # type: ignore[arg-type]


def leased(broker: LeaseBroker) -> int:
    return sum(p.current_leases for p in broker.proxies())


def spawn(url: str, out: Path, threads: int, seconds: float, hold: float, mode: str = "run") -> subprocess.Popen[str]:
    args = [str(a) for a in (url, out, threads, seconds, hold, mode)]
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, text=True)


def test_slots_are_reused_and_go_back_when_idle(url: str) -> None:
    seed(url)
    broker = blocked(url)
    try:
        hosts = []
        for _ in range(40):
            with broker.lease() as lease:
                hosts.append(lease.host)
        block = broker._selection.blocks()[0]
        assert block.counters["slots_lent"] == 40
        assert block.counters["slots_taken"] <= block.spread  # a few storage leases served them all
        assert set(hosts[-8:]) == {p.split("//")[1].split(":")[0] for p in PROXIES}  # still rotating
        assert broker.held == 0 and leased(broker) >= 1  # kept for the next request...
        deadline = time.monotonic() + 3
        while leased(broker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leased(broker) == 0  # ...and given back once idle, with no request to trigger it
    finally:
        broker.close()


def test_acquire_leases_takes_distinct_unlimited_proxies_in_one_transaction(url: str) -> None:
    """The block's growth statement: up to `count` proxies without a max_concurrency, in
    the selector's order, each counted once; limited proxies are left to single leases."""
    LeaseBroker.from_proxies(PROXIES[:3], storage=url).storage.close()  # type: ignore[attr-defined]
    limited = LeaseBroker.from_proxies(["http://10.66.0.9:3128"], storage=url, max_concurrency=1)
    storage: Any = limited.storage
    try:
        got = storage.acquire_leases("default", "grower", 30, 10, None, limited.selector)
        hosts = sorted(str(proxy.host) for _, proxy in got)
        assert hosts == ["10.66.0.1", "10.66.0.2", "10.66.0.3"]  # 10.66.0.9 has a limit
        assert len({lease.id for lease, _ in got}) == 3
        assert all(lease.proxy_id == proxy.id and lease.pool_name == "default" for lease, proxy in got)
        assert {p.host: p.current_leases for p in limited.proxies()} == {
            "10.66.0.1": 1,
            "10.66.0.2": 1,
            "10.66.0.3": 1,
            "10.66.0.9": 0,
        }
        assert storage.count_active_leases("default") == 3
        # Round robin: the next batch starts with the proxies picked least recently.
        again = storage.acquire_leases("default", "grower", 30, 1, None, limited.selector)
        assert str(again[0][1].host) == hosts_in_pick_order(got)[0]
        storage.release_leases([lease for lease, _ in got + again])
        assert leased(limited) == 0 and storage.count_active_leases("default") == 0
    finally:
        storage.close()


def hosts_in_pick_order(got: list[Any]) -> list[str]:
    return [str(proxy.host) for _, proxy in got]


def test_takes_waiting_at_once_share_one_storage_lease(url: str) -> None:
    """Eight threads ask for a slot at once: the take that leases from the storage
    leases for every take waiting then, in one statement, and each gets its own proxy."""
    LeaseBroker.from_proxies([f"http://10.66.1.{i}:3128" for i in range(1, 13)], storage=url).storage.close()  # type: ignore[attr-defined]
    broker = blocked(url)
    storage: Any = broker.storage
    first = broker.acquire()  # makes the block; its slot stays lent below
    block = broker._selection.blocks()[0]
    calls: list[int] = []

    def gated(real: Any, many: bool) -> Any:
        def call(*args: Any) -> Any:
            # Timing made deterministic (not a fault): the first storage call waits until
            # the seven other takes wait for it, as a burst of requests does on a busy
            # machine; the growth after it then leases for all seven at once.
            deadline = time.monotonic() + 10
            while not calls and block._waiting < 7 and time.monotonic() < deadline:
                time.sleep(0.001)
            calls.append(args[3] if many else 1)
            return real(*args)

        return call

    block._many = gated(storage.acquire_leases, True)
    storage.acquire_lease = gated(storage.acquire_lease, False)
    leases: list[Any] = []
    try:
        with ThreadPoolExecutor(8) as pool:
            leases = list(pool.map(lambda _: broker.acquire(), range(8)))
        assert sum(calls) == 8 and len(calls) <= 2, calls  # was one storage lease per take
        hosts = [lease.host for lease in [first, *leases]]
        assert len(set(hosts)) == 9, hosts
        assert leased(broker) == 9
    finally:
        for lease in [first, *leases]:
            broker.release(lease)
        broker.close()
    assert leased(broker) == 0


def test_one_upkeep_thread_per_block_started_by_a_take_and_ended_when_nothing_is_held(url: str) -> None:
    """A give-back may run on an event loop, so it starts no thread: the block's upkeep
    thread is started by the `take` that leases from the storage, gives the idle slots
    back, and ends once the block holds nothing; the next `take` starts another."""
    seed(url)
    broker = blocked(url)
    others = set(threading.enumerate())  # another test's blocks may still be winding down

    def upkeep_threads() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t.name == f"pharox-block-{broker.pool}" and t.is_alive() and t not in others
        ]

    def wait_until(done: Any) -> bool:
        deadline = time.monotonic() + 5
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(done())

    try:
        for _ in range(20):
            with broker.lease():
                pass
        assert len(upkeep_threads()) == 1 and leased(broker) >= 1
        assert wait_until(lambda: leased(broker) == 0)  # given back once idle, by that thread...
        assert wait_until(lambda: not upkeep_threads())  # ...which then ends
        with broker.lease():
            assert len(upkeep_threads()) == 1  # the next storage lease starts another
        assert wait_until(lambda: leased(broker) == 0 and not upkeep_threads())
    finally:
        broker.close()


def test_close_gives_back_every_slot(url: str) -> None:
    seed(url)
    broker = blocked(url)
    held = [broker.acquire() for _ in range(3)]
    for lease in held:
        broker.release(lease)
    assert leased(broker) == 3
    broker.close()
    observer = LeaseBroker.from_proxies([], storage=url)
    try:
        assert leased(observer) == 0
    finally:
        observer.storage.close()  # type: ignore[attr-defined]


def test_max_concurrency_holds_across_processes_and_a_tight_pool_is_shared(url: str, tmp_path: Path) -> None:
    """Two proxies of max_concurrency 1, two processes of 4 threads each: no proxy is ever
    lent twice at once, and neither process hoards the pool."""
    seed(url, max_concurrency=1, n=2)
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    children = [spawn(url, out, threads=4, seconds=3.0, hold=0.02) for out in outs]
    for child in children:
        assert child.wait(timeout=60) == 0
    rows = {out.name: [json.loads(line) for line in out.read_text().splitlines()] for out in outs}
    every = sorted((start, end, host) for name in rows for start, end, host in rows[name])
    last_end: dict[str, float] = {}
    for start, end, host in every:
        assert start >= last_end.get(host, 0.0) - 0.001, f"{host} lent twice at once"
        last_end[host] = end
    # Shares over the window both processes were running (one starts a little later).
    both_from = max(min(r[0] for r in rs) for rs in rows.values())
    both_to = min(max(r[1] for r in rs) for rs in rows.values())
    assert both_to - both_from > 1.0, (both_from, both_to)
    counts = [sum(1 for r in rs if both_from <= r[0] and r[1] <= both_to) for rs in rows.values()]
    assert min(counts) >= 0.25 * sum(counts), counts  # shared, not hoarded (measured ~0.5 each)


def test_a_proxy_benched_by_another_process_is_dropped_within_a_second(url: str) -> None:
    seed(url)
    lender = blocked(url)
    other = LeaseBroker.from_proxies([], storage=url)
    try:
        held = [lender.acquire() for _ in range(4)]  # a free slot on every proxy
        for lease in held:
            lender.release(lease)
        victim = held[0].host
        with other.lease() as lease:
            while lease.host != victim:
                other.release(lease)
                lease = other.acquire()
            other.report(lease, status_code=403)  # no site: benched everywhere
        banned_at = time.monotonic()
        late: set[str] = set()
        while time.monotonic() < banned_at + 2.5:
            with lender.lease() as lease:
                if time.monotonic() > banned_at + 1.2:
                    late.add(lease.host)
            time.sleep(0.01)
        assert late and victim not in late
    finally:
        lender.close()
        other.storage.close()  # type: ignore[attr-defined]


def test_a_killed_processs_slots_come_back_after_lease_seconds(url: str, tmp_path: Path) -> None:
    seed(url)
    child = spawn(url, tmp_path / "unused", threads=1, seconds=0, hold=0, mode="kill")
    assert child.stdout is not None and child.stdout.readline().strip() == "holding"
    observer = LeaseBroker.from_proxies([], storage=url)
    try:
        assert leased(observer) == 1  # the slot it kept for its next request
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        time.sleep(2.2)  # lease_seconds=2 in the child, and no heartbeat since the kill
        observer.storage.cleanup_expired_leases(force=True)  # type: ignore[attr-defined]
        assert leased(observer) == 0
    finally:
        observer.storage.close()  # type: ignore[attr-defined]


def test_many_threads_lose_no_slot(url: str) -> None:
    seed(url, max_concurrency=2)
    broker = blocked(url)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                with broker.lease():
                    time.sleep(0.001)
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert broker.held == 0
    assert all(p.current_leases <= 2 for p in broker.proxies())
    broker.close()
    assert leased(broker) == 0


class _CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor (where `asyncio.to_thread` runs), counting its jobs."""

    jobs = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        type(self).jobs += 1
        return super().submit(*args, **kwargs)


def test_an_event_loop_is_lent_slots_and_gives_them_back_inline(
    url: str, http_proxy: KitProxy, target: TargetServer
) -> None:
    """httpx's async transport on a shared storage with blocks: once the block has grown,
    a request is lent a slot and gives it back on the loop itself, without a worker
    thread (the storage is not called); nothing is lost and every request arrives."""
    host_port = http_proxy.url.split("://", 1)[1]
    entries = [f"http://u{i}:p{i}@{host_port}" for i in range(6)]
    LeaseBroker.from_proxies(entries, storage=url).storage.close()  # type: ignore[attr-defined]
    broker = blocked(url)
    target.reset()
    requests_sent = 200
    _CountingExecutor.jobs = 0

    async def crawl() -> list[int]:
        asyncio.get_running_loop().set_default_executor(_CountingExecutor(max_workers=4))
        transport = AsyncPharoxTransport(broker)
        async with httpx.AsyncClient(transport=transport, timeout=30) as client:
            todo = iter(range(requests_sent))

            async def worker() -> list[int]:
                return [(await client.get(f"{target.url}/page/{i}?n={requests_sent}")).status_code for i in todo]

            done = await asyncio.gather(*(worker() for _ in range(8)))
        return [code for codes in done for code in codes]

    try:
        codes = asyncio.run(crawl())
        assert codes == [200] * requests_sent
        arrived = sorted(r.path for r in target.requests)
        assert arrived == sorted(f"/page/{i}?n={requests_sent}" for i in range(requests_sent))  # each once
        lent_inline = sum(b.counters["slots_lent_inline"] for b in broker._selection.blocks())
        # The block grows to its spread off the loop first (8 slots: a few requests);
        # a site refresh or revival scan sends one more off the loop now and then.
        assert lent_inline >= requests_sent * 0.8, lent_inline
        assert _CountingExecutor.jobs <= requests_sent * 0.2, _CountingExecutor.jobs
        assert broker.held == 0
    finally:
        broker.close()
    assert leased(broker) == 0


def test_an_event_loops_burst_is_leased_in_a_few_statements(url: str) -> None:
    """Twenty requests start at once on an event loop with no block yet: each goes off
    the loop, announced first, and the block's first growths lease for all of them
    (it was one storage lease and one read per request)."""
    LeaseBroker.from_proxies([f"http://10.66.2.{i}:3128" for i in range(1, 31)], storage=url).storage.close()  # type: ignore[attr-defined]
    broker = blocked(url)
    burst = 20

    async def start_all() -> list[Any]:
        return list(await asyncio.gather(*(broker.acquire_async() for _ in range(burst))))

    leases: list[Any] = []
    try:
        leases = asyncio.run(start_all())
        assert len({lease.host for lease in leases}) == burst
        block = broker._selection.blocks()[0]
        # Measured: 1-2 statements; a worker thread that wins the GIL before the loop has
        # started the other requests makes one more.
        assert block.counters["storage_takes"] <= 4, block.counters
        assert leased(broker) >= burst
    finally:
        for lease in leases:
            broker.release(lease)
        broker.close()
    assert leased(broker) == 0


def test_a_running_block_sweeps_a_killed_processs_leases(url: str, tmp_path: Path) -> None:
    """No observer forcing a sweep: the live process's block, busy on an event loop
    (its growths lease in one statement and do not sweep), returns the dead process's
    lease from its upkeep thread once `lease_seconds` are over."""
    seed(url)
    child = spawn(url, tmp_path / "unused", threads=1, seconds=0, hold=0, mode="kill")
    assert child.stdout is not None and child.stdout.readline().strip() == "holding"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    killed_at = time.monotonic()
    broker = blocked(url)
    observer = LeaseBroker.from_proxies([], storage=url)
    swept_by_then: list[int] = []

    async def busy() -> None:
        async def worker() -> None:
            while time.monotonic() < killed_at + 3.5:  # the child's lease_seconds=2, then sweeps
                lease = await broker.acquire_async()
                await asyncio.sleep(0.005)
                await broker.release_async(lease)

        await asyncio.gather(*(worker() for _ in range(3)))
        block = broker._selection.blocks()[0]
        swept_by_then.append(leased(observer) - block.holds())  # leases nobody alive holds

    try:
        asyncio.run(busy())
        assert swept_by_then == [0]
    finally:
        broker.close()
        observer.storage.close()  # type: ignore[attr-defined]



@pytest.mark.parametrize("call", ["acquire_lease", "acquire_leases"])
def test_rows_another_transaction_holds_for_a_moment_are_not_an_empty_pool(url: str, call: str) -> None:
    """Another process's lease transaction holds the pool's rows for the milliseconds of
    its commit.  A lease asked for meanwhile gets a proxy once they are free: it does not
    report the pool empty, which made a lease block count the pool as contended for
    seconds (seen at the start of 4 MariaDB crawlers at once).  A pool held longer is
    reported empty after a bounded wait (PostgreSQL, MariaDB: rows are skipped, not
    waited for; SQLite: writers queue on its one write lock)."""
    seed(url)
    storage: Any = storage_from_url(url)
    holder = sa.create_engine(url)
    sqlite = url.startswith("sqlite")

    def ask() -> tuple[list[Any], float]:
        start = time.monotonic()
        if call == "acquire_lease":
            one = storage.acquire_lease("default", "asker", 30)
            got = [one] if one is not None else []
        else:
            got = [lease for lease, _ in storage.acquire_leases("default", "asker", 30, 4)]
        return got, time.monotonic() - start

    def held_for(seconds: float) -> tuple[list[Any], float]:
        with holder.connect() as conn:
            if sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite's one write lock
            else:
                conn.begin()
                assert len(conn.exec_driver_sql("SELECT id FROM pxi_proxies FOR UPDATE").all()) == 4
            with ThreadPoolExecutor(1) as pool:
                asked = pool.submit(ask)
                time.sleep(seconds)
                conn.rollback()
                return asked.result(timeout=30)

    try:
        got, _ = held_for(0.015)
        assert got, "a pool held for 15 ms was reported empty"
        storage.release_leases(got)
        if not sqlite:
            got, took = held_for(1.0)
            assert got == []  # held past the wait: empty, as before, after a bounded wait:
            # 77 ms of pauses plus the picks; 0.8 s is generous for a loaded 2-core machine
            # and below the 1 s the rows were held (waiting on the lock would take that).
            # The 15 ms hold above leaves the asker 60 ms of pauses to spare for a late
            # wake-up of this thread.
            assert took < 0.8, took
        assert storage.count_active_leases("default") == 0
        checker = LeaseBroker.from_proxies([], storage=storage)
        assert leased(checker) == 0  # every proxy's lease count back to zero
    finally:
        storage.close()
        holder.dispose()
