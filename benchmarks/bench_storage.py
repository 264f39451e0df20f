"""Acquire+release cost of MemoryStorage vs pharox's InMemoryStorage, by pool size.

Everything goes through `pharox.ProxyManager` (which also calls
`cleanup_expired_leases` and `get_pool_stats` twice per lease), so the numbers are
what a caller pays.  Prints, in one run:

1. a table per pool size x selector x threads with the median microseconds per
   acquire+release for both storages (pharox's is time-boxed per cell, see --budget);
2. the core path, acquire+report+release through `LeaseBroker` on MemoryStorage;
3. the cost after 1,000 vs 1,000,000 leases (history must not make it grow);
4. RSS after up to 1,000,000 `apply_health_check_result` calls on 1,000 proxies.

    python benchmarks/bench_storage.py            # full run (a few minutes)
    python benchmarks/bench_storage.py --quick    # smaller counts, ~1 minute

Medians, not means: the machine is shared.  Never used as a test.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pharox import (
    HealthCheckResult,
    InMemoryStorage,
    IStorage,
    Proxy,
    ProxyManager,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    SelectorStrategy,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pharox_integrations.storage.memory import MemoryStorage

if TYPE_CHECKING:
    from pharox_integrations.broker import LeaseBroker

POOL = "bench"
FULL = {
    "ops": 2000,
    "budget": 3.0,
    "many_leases": 1_000_000,
    "pharox_leases": 5_000,
    "window": 2000,
    "health_calls": 1_000_000,
    "pharox_health_calls": 100_000,
}
QUICK = {
    "ops": 600,
    "budget": 1.0,
    "many_leases": 100_000,
    "pharox_leases": 3_000,
    "window": 1000,
    "health_calls": 100_000,
    "pharox_health_calls": 20_000,
}


@dataclass
class Cell:
    median_us: float
    ops: int
    ops_per_s: float
    boxed: bool  # stopped by the time budget before the planned op count


def make_proxies(pool: ProxyPool, count: int, max_concurrency: int | None) -> list[Proxy]:
    return [
        Proxy(
            host=f"127.0.{i // 60000}.1",
            port=1024 + i % 60000,
            protocol=ProxyProtocol.HTTP,
            pool_id=pool.id,
            status=ProxyStatus.ACTIVE,
            max_concurrency=max_concurrency,
        )
        for i in range(count)
    ]


def build(factory: Callable[[], IStorage], pool: ProxyPool, proxies: Sequence[Proxy]) -> IStorage:
    storage = factory()
    storage.save_pool(pool)
    storage.add_proxies_bulk(proxies)
    return storage


def measure(
    manager: ProxyManager, selector: SelectorStrategy, threads: int, ops: int, budget_s: float
) -> Cell:
    """Median latency of acquire+release over `ops` (split over threads), time-boxed."""
    for _ in range(3):  # warm-up; also builds the selector's index
        got = manager.acquire_proxy(POOL, selector=selector)
        if got is not None:
            manager.release_proxy(got)
    samples: list[list[int]] = [[] for _ in range(threads)]
    per_thread = max(1, ops // threads)
    barrier = threading.Barrier(threads)
    deadline = [0.0]
    boxed = [False]

    def work(out: list[int]) -> None:
        barrier.wait()
        clock = time.perf_counter_ns
        for _ in range(per_thread):
            start = clock()
            got = manager.acquire_proxy(POOL, selector=selector)
            if got is not None:
                manager.release_proxy(got)
            out.append(clock() - start)
            if time.perf_counter() > deadline[0]:
                boxed[0] = len(out) < per_thread
                return

    gc.collect()
    started = time.perf_counter()
    deadline[0] = started + budget_s
    workers = [threading.Thread(target=work, args=(samples[i],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    flat = [s for chunk in samples for s in chunk]
    return Cell(statistics.median(flat) / 1000, len(flat), len(flat) / wall, boxed[0])


def fmt(cell: Cell | None) -> str:
    if cell is None:
        return "skipped"
    mark = "*" if cell.boxed else ""
    return f"{cell.median_us:,.1f}{mark} ({cell.ops})"


def storage_table(args: argparse.Namespace) -> dict[tuple[int, str, int], tuple[Cell, Cell | None]]:
    results: dict[tuple[int, str, int], tuple[Cell, Cell | None]] = {}
    print(
        f"\n## acquire+release through pharox.ProxyManager "
        f"(max_concurrency={args.max_concurrency}, median us/op, (ops measured))"
    )
    print("| proxies | selector | threads | MemoryStorage | ops/s | pharox InMemoryStorage | ops/s | speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        pool = ProxyPool(name=POOL)
        proxies = make_proxies(pool, size, args.max_concurrency)
        ours = ProxyManager(build(MemoryStorage, pool, proxies))
        theirs = None
        if not args.skip_pharox and size <= args.pharox_max:
            theirs = ProxyManager(build(InMemoryStorage, pool, proxies))
        for selector in SelectorStrategy:
            for threads in args.threads:
                mine = measure(ours, selector, threads, args.ops, budget_s=60.0)
                other = measure(theirs, selector, threads, args.ops, args.budget) if theirs else None
                results[(size, selector.value, threads)] = (mine, other)
                speed = f"{other.median_us / mine.median_us:,.0f}x" if other else "-"
                other_rate = f"{other.ops_per_s:,.0f}" if other else "-"
                print(
                    f"| {size:,} | {selector.value} | {threads} | {fmt(mine)} | {mine.ops_per_s:,.0f} "
                    f"| {fmt(other)} | {other_rate} | {speed} |",
                    flush=True,
                )
        del ours, theirs, proxies
        gc.collect()
    print(f"\n`*` = pharox cell stopped by its {args.budget:g} s time box before {args.ops} ops.")
    return results


def goals(results: dict[tuple[int, str, int], tuple[Cell, Cell | None]], sizes: Sequence[int]) -> None:
    print("\n## goals (1 thread)")
    small, large = min(sizes), max(sizes)
    for selector in SelectorStrategy:
        base = results.get((small, selector.value, 1))
        top = results.get((large, selector.value, 1))
        if base and top:
            ratio = top[0].median_us / base[0].median_us
            verdict = "ok" if ratio <= 2 else "MISSED"
            print(f"- {selector.value}: {large:,} vs {small:,} proxies = {ratio:.2f}x (goal <= 2x) {verdict}")
        at10k = results.get((10_000, selector.value, 1))
        if at10k and at10k[1]:
            speed = at10k[1].median_us / at10k[0].median_us
            verdict = "ok" if speed >= 50 else "MISSED"
            print(f"- {selector.value}: 10,000 proxies, {speed:,.0f}x faster than pharox (goal >= 50x) {verdict}")


def broker_rows(args: argparse.Namespace) -> None:
    try:
        from pharox_integrations.broker import LeaseBroker
    except ImportError as exc:  # the core is written by the lead; say so if absent
        print(f"\n## core path: skipped (LeaseBroker not importable: {exc})")
        return
    print("\n## core path: LeaseBroker acquire + report(200, 5 ms) + release on MemoryStorage")
    print("Pool: half http, half socks5 proxies; 'http only' is the Scrapy door's protocols=(http, https).")
    print("| proxies | threads | any protocol: median us/op | ops/s | http only: median us/op | ops/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        urls = [
            f"{'socks5' if i % 2 else 'http'}://127.0.{i // 60000}.1:{1024 + i % 60000}" for i in range(size)
        ]
        broker = LeaseBroker.from_proxies(urls, pool="default", storage=MemoryStorage())
        for threads in args.threads:
            cells = [_broker_cell(broker, threads, args.ops, protocols) for protocols in (None, ("http", "https"))]
            row = " | ".join(f"{median:,.1f} | {rate:,.0f}" for median, rate in cells)
            print(f"| {size:,} | {threads} | {row} |", flush=True)
        del broker
        gc.collect()
    print("Goal: < 100 us median at 100,000 proxies (1 thread).")


def _broker_cell(
    broker: LeaseBroker, threads: int, ops: int, protocols: tuple[str, ...] | None
) -> tuple[float, float]:
    """(median us per acquire+report+release, ops/s) over `ops` split over threads."""
    samples: list[list[int]] = [[] for _ in range(threads)]
    per_thread = max(1, ops // threads)

    def work(out: list[int], count: int) -> None:
        clock = time.perf_counter_ns
        for _ in range(count):
            start = clock()
            lease = broker.acquire(protocols=protocols)
            broker.report(lease, status_code=200, latency_ms=5)
            broker.release(lease)
            out.append(clock() - start)

    work([], 20)  # warm-up (builds the selector's index)
    gc.collect()
    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(samples[i], per_thread)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    flat = [s for chunk in samples for s in chunk]
    return statistics.median(flat) / 1000, len(flat) / wall


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _lease_window(manager: ProxyManager, ops: int) -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(ops):
        start = clock()
        got = manager.acquire_proxy(POOL, selector=SelectorStrategy.ROUND_ROBIN)
        if got is not None:
            manager.release_proxy(got)
        samples.append(clock() - start)
    return statistics.median(samples) / 1000


def history(args: argparse.Namespace) -> None:
    print(f"\n## cost after many leases (1,000 proxies, round_robin, median of 3 medians of {args.window // 3} ops)")
    print("| storage | leases made before | median us/op | leases kept after | RSS MB |")
    print("|---|---:|---:|---:|---:|")
    pool = ProxyPool(name=POOL)
    proxies = make_proxies(pool, 1000, args.max_concurrency)
    runs: list[tuple[str, Callable[[], IStorage], int]] = [("MemoryStorage", MemoryStorage, args.many_leases)]
    if not args.skip_pharox:
        runs.append(("pharox InMemoryStorage", InMemoryStorage, args.pharox_leases))
    for name, factory, total in runs:
        storage = build(factory, pool, proxies)
        manager = ProxyManager(storage)
        done = 0
        window = max(1, args.window // 3)
        for checkpoint in (1000, total):
            while done < checkpoint:
                got = manager.acquire_proxy(POOL, selector=SelectorStrategy.ROUND_ROBIN)
                if got is not None:
                    manager.release_proxy(got)
                done += 1
            median = statistics.median(_lease_window(manager, window) for _ in range(3))
            kept = len(storage.list_leases())
            print(f"| {name} | {checkpoint:,} | {median:,.1f} | {kept:,} | {rss_mb():,.0f} |", flush=True)
            done += 3 * window
        del storage, manager
        gc.collect()


def health_memory(args: argparse.Namespace) -> None:
    print("\n## RSS while applying health results (1,000 proxies, one result per call)")
    print("| storage | calls | RSS MB | RSS growth since seeded, MB | us/call (median of last 1,000) |")
    print("|---|---:|---:|---:|---:|")
    pool = ProxyPool(name=POOL)
    proxies = make_proxies(pool, 1000, args.max_concurrency)
    results = [
        HealthCheckResult(proxy_id=p.id, status=ProxyStatus.ACTIVE, latency_ms=5 + i % 50, protocol=p.protocol)
        for i, p in enumerate(proxies)
    ]
    runs: list[tuple[str, Callable[[], IStorage], int]] = [("MemoryStorage", MemoryStorage, args.health_calls)]
    if not args.skip_pharox:
        runs.append(("pharox InMemoryStorage", InMemoryStorage, args.pharox_health_calls))
    for name, factory, total in runs:
        gc.collect()
        storage = build(factory, pool, proxies)
        seeded = rss_mb()
        checkpoints = sorted({c for c in (10_000, 100_000, 250_000, 500_000, total) if c <= total})
        done = 0
        clock = time.perf_counter_ns
        for checkpoint in checkpoints:
            samples: deque[int] = deque(maxlen=1000)  # a long list would itself grow RSS
            while done < checkpoint:
                start = clock()
                storage.apply_health_check_result(results[done % 1000])
                samples.append(clock() - start)
                done += 1
            median = statistics.median(samples) / 1000
            rss = rss_mb()
            print(f"| {name} | {done:,} | {rss:,.0f} | {rss - seeded:+,.0f} | {median:,.1f} |", flush=True)
        del storage
        gc.collect()


def _without_only(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skipping = False
    for token in argv:
        if token == "--only":
            skipping = True
        elif skipping and not token.startswith("--"):
            continue
        else:
            skipping = False
            kept.append(token)
    return kept


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts for a fast run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1_000, 10_000, 100_000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ops", type=int, help="acquire+release per cell (2000; quick 600)")
    parser.add_argument("--budget", type=float, help="seconds per pharox cell, its time box (3; quick 1)")
    parser.add_argument("--pharox-max", type=int, default=100_000, help="largest pool to run pharox on")
    parser.add_argument("--skip-pharox", action="store_true")
    parser.add_argument("--max-concurrency", type=int, default=None, help="per proxy (default: unlimited)")
    parser.add_argument("--many-leases", type=int, help="leases before the second history row (1M; quick 100k)")
    parser.add_argument("--pharox-leases", type=int, help="same for pharox (5k; quick 3k)")
    parser.add_argument("--window", type=int, help="ops per median in the history table (2000; quick 1000)")
    parser.add_argument("--health-calls", type=int, help="apply_health_check_result calls (1M; quick 100k)")
    parser.add_argument("--pharox-health-calls", type=int, help="same for pharox (100k; quick 20k)")
    parser.add_argument("--only", choices=["table", "broker", "history", "health"], nargs="+")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    sections = args.only or ["table", "broker", "history", "health"]
    if len(sections) > 1:
        # One fresh process per section, so RSS readings are not inflated by the
        # allocations of earlier sections (CPython seldom returns freed memory).
        print(f"# bench_storage ({'quick' if args.quick else 'full'} run, python {sys.version.split()[0]})", flush=True)
        passthrough = _without_only(list(sys.argv[1:] if argv is None else argv))
        for section in sections:
            subprocess.run([sys.executable, __file__, *passthrough, "--only", section], check=True)
        return
    only = set(sections)
    if "table" in only:
        goals(storage_table(args), args.sizes)
    if "broker" in only:
        broker_rows(args)
    if "history" in only:
        history(args)
    if "health" in only:
        health_memory(args)


if __name__ == "__main__":
    main()
