"""Requests/s through `PharoxAdapter` against plain requests, in one run.

    python benchmarks/bench_requests.py            # 2,000 requests per run, 3 runs per cell
    python benchmarks/bench_requests.py --quick    # 300 requests per run, for a smoke run

Series, all through the SAME local proxy process to the same local target:

- static:   a plain `requests.Session` with a static `proxies=` to one entry;
- rotation: a plain Session rotating over the pool entries with `itertools.cycle`
            (behind a lock when threaded), no leasing: what leasing is compared to;
- pharox:   `pharox_session(broker)` over a `LeaseBroker` holding the same entries
            (memory storage, round robin, adapter defaults: `pool_connections=10`).

Pool sizes 10 and 10,000 entries, 1 and 8 threads sharing one Session.  The proxy is
pproxy (HTTP, no auth, through the test kit's `pproxy_main` launcher) by default:
on this machine proxy.py opened new proxied connections at ~30/s against pproxy's
~150/s, which would hide every client-side cost at 10,000 entries (`--proxy proxypy`
to compare).  The entries all point at that one server, told apart by their user names
(``http://u<i>:p<i>@127.0.0.1:<port>``): to requests each is a distinct proxy (its own
manager and keep-alive connection), to the broker a distinct pool entry.  Rotating
among 10,000 distinct endpoints costs connection reuse whatever library does it; the
ratio to `rotation` is what leasing itself costs.  The target runs in its own process
so it does not share the GIL with the client.  Medians of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from loopback import entries, start_pproxy, start_target  # noqa: E402
from servers import ProxyKit  # noqa: E402

from pharox_integrations import LeaseBroker  # noqa: E402
from pharox_integrations.requests import pharox_session  # noqa: E402

Fetch = Callable[[str], int]
Finish = Callable[[], None]
Series = Callable[[], tuple[Fetch, Finish]]


def run(fetch: Fetch, url: str, total: int, threads: int, finish: Finish | None = None) -> tuple[float, float]:
    """(requests/s, client CPU µs per request) for `total` GETs over `threads` threads.

    `finish` (closing the session) is timed too: a plain Session rotating over 10,000
    entries keeps every connection open until then, and would otherwise leave its
    teardown out of the window while the bounded adapter pays it as it goes.
    """
    per = total // threads
    failures: list[int] = []

    def work() -> None:
        for _ in range(per):
            status = fetch(url)
            if status != 200:
                failures.append(status)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if finish is not None:
        finish()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {failures[:5]}")
    done = per * threads
    return done / elapsed, cpu / done * 1e6


def static_series(port: int) -> tuple[Fetch, Callable[[], None]]:
    session = requests.Session()
    proxies = {"http": entries(port, 1)[0]}
    return (lambda url: session.get(url, proxies=proxies).status_code), session.close


def rotation_series(port: int, n: int) -> tuple[Fetch, Callable[[], None]]:
    session = requests.Session()
    cycle = itertools.cycle(entries(port, n))
    lock = threading.Lock()

    def fetch(url: str) -> int:
        with lock:
            proxy = next(cycle)
        return session.get(url, proxies={"http": proxy}).status_code

    return fetch, session.close


def pharox_series(port: int, n: int) -> tuple[Fetch, Callable[[], None]]:
    broker = LeaseBroker.from_proxies(entries(port, n))
    session = pharox_session(broker)

    def close() -> None:
        assert broker.held == 0, "a lease was left held"  # before close() would release it
        session.close()
        broker.close()

    return (lambda url: session.get(url).status_code), close


def measure(make: Series, url: str, total: int, threads: int) -> tuple[float, float]:
    fetch, close = make()
    try:
        run(fetch, url, min(50, total), threads)  # warm-up: imports, first connections
        return run(fetch, url, total, threads, finish=close)
    except BaseException:
        close()
        raise
    finally:
        time.sleep(0.3)  # let the proxy and the target drop the closed connections


def cell(series: dict[str, Series], url: str, total: int, threads: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (rate, cpu) per series; the series take turns within each repeat, so a
    burst of load from other processes on this shared machine hits them alike."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in series}
    for _ in range(repeats):
        for name, make in series.items():
            samples[name].append(measure(make, url, total, threads))
    return {
        name: (statistics.median(r for r, _ in got), statistics.median(c for _, c in got))
        for name, got in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 requests per run")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 2000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="10,10000")
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--proxy", choices=["pproxy", "proxypy"], default="pproxy")
    args = parser.parse_args()
    total = args.requests or (300 if args.quick else 2000)
    sizes = [int(x) for x in args.sizes.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]
    logging.basicConfig(level=logging.WARNING)

    target, url = start_target()
    url += "/"
    kit = ProxyKit()
    proxy_proc: subprocess.Popen[str] | None = None
    try:
        if args.proxy == "pproxy":
            proxy_proc, port = start_pproxy()
        else:
            port = kit.http().port
        with kit:
            print(
                f"requests {requests.__version__}; {args.proxy} at 127.0.0.1:{port}; target in its own process; "
                f"{total} requests per run; median of {args.repeats} runs"
            )
            print(
                f"{'entries':>8} {'threads':>7} {'static':>8} {'rotation':>8} {'pharox':>8} {'vs rotation':>11} "
                f"{'vs static':>9}   client CPU us/req: {'static':>6} {'rotation':>8} {'pharox':>6}"
            )
            for threads in thread_counts:
                for n in sizes:
                    got = cell(
                        {
                            "static": partial(static_series, port),
                            "rotation": partial(rotation_series, port, n),
                            "pharox": partial(pharox_series, port, n),
                        },
                        url,
                        total,
                        threads,
                        args.repeats,
                    )
                    (static, s_cpu), (rotation, r_cpu), (pharox, p_cpu) = got["static"], got["rotation"], got["pharox"]
                    print(
                        f"{n:>8,} {threads:>7} {static:>8.0f} {rotation:>8.0f} {pharox:>8.0f} "
                        f"{pharox / rotation:>10.2f}x {pharox / static:>8.2f}x   "
                        f"{'':>18} {s_cpu:>6.0f} {r_cpu:>8.0f} {p_cpu:>6.0f}",
                        flush=True,
                    )
    finally:
        if proxy_proc is not None:
            proxy_proc.terminate()
            proxy_proc.wait(10)
        if target.stdin is not None:
            target.stdin.close()
        target.wait(10)


if __name__ == "__main__":
    main()
