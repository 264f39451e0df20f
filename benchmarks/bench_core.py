"""Cost of one request's lease through the core, against bare pharox, in one run.

    python benchmarks/bench_core.py            # pool sizes 10 .. 100,000
    python benchmarks/bench_core.py --quick    # smaller, for a smoke run
    python benchmarks/bench_core.py --reports 1000000   # memory after N report() calls
    python benchmarks/bench_core.py --sites 1000        # per-site state for 1,000 sites

Prints medians of `--repeats` runs (the machines are shared and noisy).  Each run
times `--ops` acquire+report+release cycles; bare pharox (ProxyManager +
InMemoryStorage, acquire+health write+release) is time-boxed at large pools
because its cost grows with the pool.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from pharox import HealthCheckResult, InMemoryStorage, ProxyManager, ProxyStatus, SelectorStrategy

from pharox_integrations import LeaseBroker


def urls(n: int) -> list[str]:
    return [f"http://u{i}:p{i}@127.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:{8000 + i % 1000}" for i in range(n)]


def time_per_op(cycle: Callable[[], None], ops: int, budget: float) -> tuple[float, int]:
    """Median-friendly: µs per op over up to `ops` cycles or `budget` seconds."""
    done = 0
    start = time.perf_counter()
    while done < ops:
        cycle()
        done += 1
        if done % 16 == 0 and time.perf_counter() - start > budget:
            break
    return (time.perf_counter() - start) / done * 1e6, done


def core_cycle(n: int) -> Callable[[], None]:
    broker = LeaseBroker.from_proxies(urls(n))

    def cycle() -> None:
        lease = broker.acquire()
        broker.report(lease, status_code=200, latency_ms=12)
        broker.release(lease)

    return cycle


def pharox_cycle(n: int) -> Callable[[], None]:
    from pharox_integrations.broker import LeaseBroker as _B

    storage = InMemoryStorage()
    seed = _B.from_proxies(urls(n), storage=storage)  # same seeding path, bare manager below
    manager = ProxyManager(storage)

    def cycle() -> None:
        lease = manager.acquire_proxy(seed.pool, selector=SelectorStrategy.ROUND_ROBIN)
        assert lease is not None
        # The naive per-request report: one health write per response.
        storage.apply_health_check_result(
            HealthCheckResult(proxy_id=lease.proxy_id, status=ProxyStatus.ACTIVE, latency_ms=12, protocol="http")
        )
        manager.release_proxy(lease)

    return cycle


def bench_pool_sizes(sizes: list[int], ops: int, repeats: int, budget: float) -> None:
    print(f"acquire+report+release, µs per request (median of {repeats} runs; ops/run ≤ {ops})")
    header = f"{'proxies':>9} | {'core (memory://)':>17} | {'bare pharox InMemory':>21} | {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    base_core = None
    for n in sizes:
        core_runs, pharox_runs, pharox_ops = [], [], 0
        core = core_cycle(n)
        bare = pharox_cycle(n)
        for _ in range(repeats):
            gc.collect()
            core_runs.append(time_per_op(core, ops, budget)[0])
            us, done = time_per_op(bare, ops, budget)
            pharox_runs.append(us)
            pharox_ops = done
        c, p = statistics.median(core_runs), statistics.median(pharox_runs)
        base_core = base_core or c
        note = "" if pharox_ops >= ops else f"  (pharox: {pharox_ops} ops in {budget:.0f}s budget)"
        print(f"{n:>9,} | {c:>14.1f} µs | {p:>18.1f} µs | {p / c:>7.1f}x{note}")
    print(f"core cost at the largest pool vs the smallest: {c / base_core:.2f}x")


def bench_reports(total: int, pool: int) -> None:
    """Memory held after `total` report() calls on a `pool`-proxy memory pool."""
    broker = LeaseBroker.from_proxies(urls(pool))
    leases = [broker.acquire() for _ in range(pool)]
    for lease in leases:
        broker.report(lease, status_code=200)
    gc.collect()
    tracemalloc.start()
    checkpoints = {}
    start = time.perf_counter()
    for i in range(1, total + 1):
        broker.report(leases[i % pool], status_code=200 if i % 97 else 404, latency_ms=i % 80)
        if i in (1_000, total // 10, total // 2, total):
            gc.collect()
            checkpoints[i] = tracemalloc.get_traced_memory()[0]
    elapsed = time.perf_counter() - start
    tracemalloc.stop()
    records = sum(len(broker.storage.list_health_records(p.id, limit=1_000_000)) for p in broker.proxies())
    print(f"report() x {total:,} on a {pool}-proxy pool ({elapsed / total * 1e6:.2f} µs per call, tracemalloc on)")
    print(f"{'after calls':>12} | {'traced memory':>14}")
    for calls, size in checkpoints.items():
        print(f"{calls:>12,} | {size / 1024:>11.1f} KiB")
    print(f"health records in the storage: {records} (routine successes are flushed at most once per proxy per minute)")
    for lease in leases:
        broker.release(lease)


def site_cycle(n: int, sites: int, held_per_site: int, delay: float = 0.0) -> Callable[[], None]:
    """The cycle with the request's URL: each request to the next of `sites` sites, each
    site holding `held_per_site` proxies off (bans in force), as a broad crawl would."""
    from pharox_integrations.sites import BAN, Hold

    broker = LeaseBroker.from_proxies(urls(n), site_delay=delay)
    targets = [f"https://www.site{i}.example/page" for i in range(sites)]
    ids = [p.id for p in broker.proxies()]
    rng = random.Random(7)
    far = time.time() + 3600
    for i in range(sites):
        for pid in rng.sample(ids, held_per_site):
            broker.sites.store.put(pid, f"site{i}.example", Hold(far, BAN, 1, far))
    turn = itertools.cycle(targets)

    def cycle() -> None:
        lease = broker.acquire(next(turn))
        broker.report(lease, status_code=200, latency_ms=12)
        broker.release(lease)

    return cycle


def bench_sites(n: int, sites: int, ops: int, repeats: int, budget: float) -> None:
    """Per-site state's cost: the same cycle without a URL, with URLs and no state, and
    with state for `sites` sites."""
    cases = {
        "no URL (no site state)": core_cycle(n),
        f"URL, {sites:,} sites, no holds": site_cycle(n, sites, 0),
        f"URL, {sites:,} sites x 10 bans": site_cycle(n, sites, 10),
        f"URL, {sites:,} sites x 10 bans, site_delay": site_cycle(n, sites, 10, delay=1e-6),
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, cycle in cases.items():
            gc.collect()
            runs[name].append(time_per_op(cycle, ops, budget)[0])
    print(f"per-site state, {n:,} proxies: acquire+report+release, µs per request (median of {repeats})")
    header = f"{'case':<42} | {'µs':>7} | {'vs no site state':>16}"
    print(header)
    print("-" * len(header))
    base = statistics.median(runs["no URL (no site state)"])
    for name, values in runs.items():
        us = statistics.median(values)
        print(f"{name:<42} | {us:>7.1f} | {us / base:>15.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes 10 and 1,000, fewer ops")
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per run before stopping early")
    parser.add_argument("--reports", type=int, default=0, help="measure memory after this many report() calls")
    parser.add_argument("--sites", type=int, default=0, help="per-site state: 10,000 proxies, this many sites")
    args = parser.parse_args()
    print(f"python {os.sys.version.split()[0]}, {os.cpu_count()} cores")
    if args.sites:
        bench_sites(10_000, args.sites, args.ops, args.repeats, args.budget)
        return
    if args.reports:
        bench_reports(args.reports, 100)
        return
    sizes = [10, 1_000] if args.quick else [10, 1_000, 10_000, 100_000]
    bench_pool_sizes(sizes, 500 if args.quick else args.ops, args.repeats, args.budget)


if __name__ == "__main__":
    main()
