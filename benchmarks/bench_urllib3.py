"""Requests/s through `PharoxProxyManager` against plain urllib3, in one run.

    python benchmarks/bench_urllib3.py            # 2,000 requests per run
    python benchmarks/bench_urllib3.py --quick    # 300 requests per run, for a smoke run

Series, all through the SAME local proxy (pproxy's HTTP proxy, run by the test kit's
launcher) to the same local target (a minimal asyncio HTTP/1.1 server in its own
process, answering each request in one write: the test kit's threaded target costs
~40 ms per keep-alive request to Nagle + delayed ACK and would hide everything else):

- static:   one `urllib3.ProxyManager` with one proxy (what users switch from);
- rotation: plain rotation without leasing: one `urllib3.ProxyManager` per pool entry,
            picked with `itertools.cycle` (behind a lock when threaded);
- pharox:   `PharoxProxyManager` over a `LeaseBroker` holding the same entries
            (memory storage, round robin, default `num_pools=10`).

Pool sizes 10 and 10,000 entries, 1 and 8 threads.  The entries all point at the one
proxy server (no auth configured), told apart by their credentials
(``http://u<i>:p<i>@127.0.0.1:<port>``): every entry is a distinct proxy to urllib3
(its own pool key, its own Proxy-Authorization) and to the broker.  Every manager gets
``maxsize=<threads>`` so no series throws connections away for being threaded.
Medians of `--repeats` runs (the machine is shared).  Next to req/s the table gives
each series' CPU time per request (`time.process_time`, all threads of this process,
the pool-closing thread included): on a loaded machine it moves less than req/s.

    python benchmarks/bench_urllib3.py --stub-io  # no sockets: what each series costs itself

`--stub-io` starts no server: every pool answers at once from memory (a canned 200), so
the table shows the client side alone (URL parsing, pool lookup and construction, the
lease and its report), free of the proxy's work and of most of the machine's noise.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import urllib3
from urllib3._version import __version__ as urllib3_version
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.response import HTTPResponse

from pharox_integrations import LeaseBroker
from pharox_integrations.urllib3 import PharoxProxyManager

Fetch = Callable[[str], int]

from loopback import entries, start_pproxy, start_target  # noqa: E402


def run(fetch: Fetch, url: str, requests: int, threads: int) -> tuple[float, float]:
    """(requests/s, CPU µs per request) for `requests` GETs spread over `threads` threads."""
    per = requests // threads
    failures: list[int] = []

    def work() -> None:
        for _ in range(per):
            status = fetch(url)
            if status != 200:
                failures.append(status)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    cpu = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {failures[:5]}")
    return per * threads / elapsed, cpu / (per * threads) * 1e6


def stub_io() -> None:
    """`--stub-io`: every connection pool answers from memory instead of the network."""

    def urlopen(self: HTTPConnectionPool, method: str, url: str, **kw: Any) -> HTTPResponse:
        return HTTPResponse(b"ok\n", status=200, request_url=url, retries=kw.get("retries"), pool=self)

    HTTPConnectionPool.urlopen = urlopen  # type: ignore[assignment,method-assign]


def static_series(port: int, threads: int) -> tuple[Fetch, Callable[[], None]]:
    pm = urllib3.ProxyManager(
        f"http://127.0.0.1:{port}",
        proxy_headers=urllib3.make_headers(proxy_basic_auth="u0:p0"),
        maxsize=threads,
    )
    return (lambda url: pm.request("GET", url).status), pm.clear


def rotation_series(port: int, n: int, threads: int) -> tuple[Fetch, Callable[[], None]]:
    managers = [
        urllib3.ProxyManager(
            f"http://127.0.0.1:{port}",
            proxy_headers=urllib3.make_headers(proxy_basic_auth=f"u{i}:p{i}"),
            maxsize=threads,
        )
        for i in range(n)
    ]
    ring = itertools.cycle(managers)
    lock = threading.Lock()

    def fetch(url: str) -> int:
        with lock:
            pm = next(ring)
        return pm.request("GET", url).status

    def close() -> None:
        for pm in managers:
            pm.clear()

    return fetch, close


def pharox_series(port: int, n: int, threads: int) -> tuple[Fetch, Callable[[], None]]:
    broker = LeaseBroker.from_proxies(entries(port, n))
    pm = PharoxProxyManager(broker, maxsize=threads)

    def close() -> None:
        pm.clear()
        assert broker.held == 0, "a lease was left held"
        broker.close()

    return (lambda url: pm.request("GET", url).status), close


def median_rates(
    makers: dict[str, Callable[[], tuple[Fetch, Callable[[], None]]]], url: str, args: Any, threads: int
) -> dict[str, tuple[float, float]]:
    """Median (req/s, CPU µs per request) per series; the series take turns within each repeat (in a rotating
    order) so a noisy neighbour on the shared machine hits them all alike."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in makers}
    names = list(makers)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            fetch, close = makers[name]()
            try:
                for _ in range(20):  # warm: first connections, imports, caches
                    fetch(url)
                # A full collection here, not inside the timed run: one takes ~100 ms with the
                # 10,000-entry series alive, so whether it landed in a run depended on what the
                # series before had allocated (a run is ~1 s).
                gc.collect()
                rates[name].append(run(fetch, url, args.requests, threads))
            finally:
                close()
            time.sleep(0.3)  # let the proxy and the target drop the closed connections
    return {
        name: (statistics.median(rate for rate, _ in r), statistics.median(cpu for _, cpu in r))
        for name, r in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 requests per run")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 2000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--stub-io", action="store_true", help="no sockets: pools answer from memory")
    args = parser.parse_args()
    args.requests = args.requests or (300 if args.quick else 2000)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    logging.getLogger("pharox_integrations").setLevel(logging.ERROR)

    servers: list[Any] = []
    if args.stub_io:
        stub_io()
        base, port, where = "http://127.0.0.1:9", 8, "no I/O (--stub-io)"
    else:
        target, base = start_target()
        proxy, port = start_pproxy()
        servers, where = [proxy, target], f"pproxy HTTP proxy at 127.0.0.1:{port}"
    try:
        url = f"{base}/status/200"
        print(f"urllib3 {urllib3_version}; {where}; {args.requests} requests per run, median of {args.repeats}")
        print(
            f"{'entries':>8} {'threads':>7} {'static':>9} {'rotation':>9} {'pharox':>9} {'pharox/rotation':>16}"
            f" {'CPU µs/req: rotation':>21} {'pharox':>7} {'rotation/pharox':>16}"
        )
        for size in args.sizes:
            for threads in args.threads:
                rates = median_rates(
                    {
                        "static": partial(static_series, port, threads),
                        "rotation": partial(rotation_series, port, size, threads),
                        "pharox": partial(pharox_series, port, size, threads),
                    },
                    url,
                    args,
                    threads,
                )
                (static, _), (rotation, rotation_cpu), (pharox, pharox_cpu) = (
                    rates["static"],
                    rates["rotation"],
                    rates["pharox"],
                )
                print(
                    f"{size:>8,} {threads:>7} {static:>9.0f} {rotation:>9.0f} {pharox:>9.0f} "
                    f"{pharox / rotation:>15.2f}x {rotation_cpu:>21.0f} {pharox_cpu:>7.0f} "
                    f"{rotation_cpu / pharox_cpu:>15.2f}x",
                    flush=True,
                )
        print("req/s and CPU µs per request, medians of the repeats; static uses one proxy whatever the pool size.")
    finally:
        for server in servers:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
