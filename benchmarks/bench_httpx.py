"""Requests/s through `AsyncPharoxTransport` against plain rotation and proxywhirl, in one run.

    python benchmarks/bench_httpx.py            # 2,000 requests per run, 5 runs per cell
    python benchmarks/bench_httpx.py --quick    # 300 requests per run, for a smoke run

Series, all `httpx.AsyncClient` GETs (`--concurrency` in flight) through the SAME local
proxy process to the same local target:

- rotation:   an `httpx.AsyncBaseTransport` that cycles over the entries and routes each
              request through a per-entry `AsyncHTTPTransport` (an LRU of 128, one SSL
              context), no leasing and no health: what leasing is compared to;
- pharox:     `AsyncPharoxTransport(LeaseBroker.from_proxies(entries))`: memory storage,
              round robin, a lease per request, reports and releases;
- proxywhirl: `proxywhirl.AsyncProxyWhirl(proxies, strategy="round-robin")`, its
              `await rotator.get(url)` (its loguru output disabled so both sides log
              nothing per request).  Skipped with a note when proxywhirl is not installed
              (`pip install 'pharox-integrations[bench]'`).

Pool sizes 10 and 10,000 entries.  The proxy is pproxy (HTTP, no auth, through the test
kit's launcher); the entries all point at it, told apart by user name
(``http://u<i>:p<i>@127.0.0.1:<port>``), so every client sees 10,000 distinct proxies:
rotating among them costs connection reuse whatever library does it.  The target is a
minimal keep-alive server in its own process.  Series take turns within each repeat (in
alternating order, after a garbage collection), so load from other processes on this
shared machine hits them alike; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import logging
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loopback import entries, start_pproxy, start_target  # noqa: E402

from pharox_integrations import LeaseBroker  # noqa: E402
from pharox_integrations.httpx import AsyncPharoxTransport  # noqa: E402

Fetch = Callable[[str], Awaitable[int]]
Series = Callable[[], Awaitable[tuple[Fetch, Callable[[], Awaitable[None]]]]]

# ---------------------------------------------------------------------- the series


class RotationTransport(httpx.AsyncBaseTransport):
    """Plain rotation: next entry, its (LRU-cached) inner transport, no bookkeeping."""

    def __init__(self, urls: list[str], size: int = 128) -> None:
        self._cycle = itertools.cycle(urls)
        self._size = size
        self._inner: OrderedDict[str, httpx.AsyncHTTPTransport] = OrderedDict()
        self._ssl = httpx.create_ssl_context()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = next(self._cycle)
        inner = self._inner.get(url)
        if inner is None:
            inner = self._inner[url] = httpx.AsyncHTTPTransport(proxy=url, verify=self._ssl)
            if len(self._inner) > self._size:
                # Closed like the pharox transport closes its evicted ones (their sockets
                # would pile up otherwise).  Safe here without tracking: the evicted one
                # served its last request 128 requests ago, with only 20 in flight.
                await self._inner.popitem(last=False)[1].aclose()
        else:
            self._inner.move_to_end(url)
        return await inner.handle_async_request(request)

    async def aclose(self) -> None:
        for inner in self._inner.values():
            await inner.aclose()


async def rotation_series(port: int, n: int) -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(transport=RotationTransport(entries(port, n)))

    async def fetch(url: str) -> int:
        return (await client.get(url)).status_code

    return fetch, client.aclose


async def pharox_series(port: int, n: int) -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    broker = LeaseBroker.from_proxies(entries(port, n))
    client = httpx.AsyncClient(transport=AsyncPharoxTransport(broker))

    async def fetch(url: str) -> int:
        return (await client.get(url)).status_code

    async def close() -> None:
        await client.aclose()
        assert broker.held == 0, "a lease was left held"
        broker.close()

    return fetch, close


async def proxywhirl_series(port: int, n: int) -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    from loguru import logger
    from proxywhirl import AsyncProxyWhirl, Proxy

    logger.disable("proxywhirl")
    proxies = [
        Proxy(url=f"http://127.0.0.1:{port}", username=f"u{i}", password=f"p{i}", allow_local=True) for i in range(n)
    ]
    rotator = AsyncProxyWhirl(proxies=proxies, strategy="round-robin", bootstrap=False)
    await rotator.__aenter__()

    async def fetch(url: str) -> int:
        return (await rotator.get(url)).status_code

    async def close() -> None:
        await rotator.__aexit__(None, None, None)
        pool = getattr(rotator, "_client_pool", None)
        clear = getattr(pool, "clear", None)
        if clear is not None:
            result = clear()
            if asyncio.iscoroutine(result):
                await result

    return fetch, close


def proxywhirl_available() -> str | None:
    """None when proxywhirl can run here, else why not."""
    try:
        import proxywhirl  # noqa: F401
    except ImportError as exc:
        return f"proxywhirl not installed ({exc}); pip install 'pharox-integrations[bench]'"
    return None


# ---------------------------------------------------------------------- measuring


async def run(fetch: Fetch, url: str, total: int, concurrency: int) -> tuple[float, float]:
    """(requests/s, client CPU µs per request) for `total` GETs, `concurrency` in flight."""
    remaining = iter(range(total))
    failures: list[str] = []

    async def worker() -> None:
        for _ in remaining:
            try:
                status = await fetch(url)
            except Exception as exc:  # counted and reported: a benchmark must not hide errors
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if status != 200:
                failures.append(str(status))

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if failures:
        raise SystemExit(f"{len(failures)} of {total} requests failed: {failures[:3]}")
    return total / elapsed, cpu / total * 1e6


async def measure(make: Series, url: str, total: int, concurrency: int) -> tuple[float, float]:
    fetch, close = await make()
    try:
        await run(fetch, url, min(100, total), concurrency)  # warm-up: imports, first connections
        gc.collect()  # no series pays for the garbage the one before it left
        return await run(fetch, url, total, concurrency)
    finally:
        await close()
        await asyncio.sleep(0.3)  # let the proxy drop the closed connections


async def cell(
    series: dict[str, Series], url: str, totals: dict[str, int], concurrency: int, repeats: int
) -> dict[str, tuple[float, float]]:
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in series}
    for turn in range(repeats):
        # Turns alternate the order (A B C, C B A, ...): whatever the first or last
        # place in a turn costs on this machine falls on every series alike.
        order = list(series.items()) if turn % 2 == 0 else list(reversed(series.items()))
        for name, make in order:
            samples[name].append(await measure(make, url, totals[name], concurrency))
    return {
        name: (statistics.median(r for r, _ in got), statistics.median(c for _, c in got))
        for name, got in samples.items()
    }


async def amain(args: Any, url: str, port: int) -> None:
    total = args.requests or (300 if args.quick else 2000)
    skipped = proxywhirl_available() if not args.no_proxywhirl else "--no-proxywhirl"
    names = ["rotation", "pharox"] + ([] if skipped else ["proxywhirl"])
    pw_total = min(total, args.proxywhirl_requests)
    print(
        f"httpx {httpx.__version__}; pproxy at 127.0.0.1:{port}; target in its own process; {total} requests "
        f"per run ({pw_total} for proxywhirl), {args.concurrency} in flight; median of {args.repeats} runs"
    )
    if skipped:
        print(f"proxywhirl skipped: {skipped}")
    head = " ".join(f"{n:>10}" for n in names)
    cpu_head = " ".join(f"{n:>10}" for n in names)
    print(
        f"{'entries':>8} {head} {'vs rotation':>11}"
        + (f" {'vs pw':>7}" if not skipped else "")
        + f"   CPU us/req: {cpu_head}"
    )
    for n in [int(x) for x in args.sizes.split(",")]:
        makers: dict[str, Series] = {
            "rotation": partial(rotation_series, port, n),
            "pharox": partial(pharox_series, port, n),
        }
        if not skipped:
            makers["proxywhirl"] = partial(proxywhirl_series, port, n)
        totals = {"rotation": total, "pharox": total, "proxywhirl": pw_total}
        got = await cell(makers, url, totals, args.concurrency, args.repeats)
        rates = " ".join(f"{got[name][0]:>10.0f}" for name in names)
        cpus = " ".join(f"{got[name][1]:>10.0f}" for name in names)
        ratio = got["pharox"][0] / got["rotation"][0]
        versus = f" {got['pharox'][0] / got['proxywhirl'][0]:>6.2f}x" if not skipped else ""
        print(f"{n:>8,} {rates} {ratio:>10.2f}x{versus}   {'':>11} {cpus}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 requests per run")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 2000)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--sizes", default="10,10000")
    parser.add_argument("--no-proxywhirl", action="store_true", help="leave proxywhirl out")
    parser.add_argument(
        "--proxywhirl-requests",
        type=int,
        default=300,
        help="requests per proxywhirl run (default 300: it builds a client, SSL context included, per new proxy)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    target, url = start_target()
    url += "/"
    proxy, port = start_pproxy()
    try:
        asyncio.run(amain(args, url, port))
    finally:
        proxy.terminate()
        proxy.wait(10)
        if target.stdin is not None:
            target.stdin.close()
        target.wait(10)


if __name__ == "__main__":
    main()
