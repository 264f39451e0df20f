"""Pages/s of one Scrapy crawl through a real local proxy: static proxy vs leasing vs rotating-proxies.

    python benchmarks/bench_scrapy.py            # 2,000 pages per crawl, median of 5 crawls per row
    python benchmarks/bench_scrapy.py --quick    # 300 pages, 1 crawl per row

Rows, every crawl through the SAME proxy process to the same target, CONCURRENT_REQUESTS=32
and CONCURRENT_REQUESTS_PER_DOMAIN=32 (so one-slot setups are not capped at Scrapy's
default 8 per slot), no delays, cookies off:

- static:             the spider sets `meta["proxy"]` to one entry; no proxy middleware;
- pharox N:           `PharoxProxyMiddleware` with N entries in `PHAROX_PROXIES_FILE`
                      (memory storage, round robin, one download slot per entry);
- pharox-unfrozen N:  the same with `PHAROX_GC_FREEZE` off: the middleware's own cost,
                      without the collector's saving the others do not have;
- rotating-proxies N: scrapy-rotating-proxies 0.6 (`pip install -e .[bench]`) with the same
                      file as `ROTATING_PROXY_LIST_PATH`.

The entries all point at one no-auth proxy, told apart by user name
(``http://u<i>:p<i>@127.0.0.1:<port>``), so every row pays the same proxy.  The proxy
is pproxy by default (`--proxy proxypy` for proxy.py); the target is a minimal asyncio
server in its own process.  Each crawl runs in its own Python process (one reactor per
process); pages/s = pages / Scrapy's `elapsed_time_seconds` (start-up, including
seeding the pool, is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback import free_port, start_pproxy, start_target  # noqa: E402

# The page every request gets: small HTML, answered in one write.
_PAGE = b"<!DOCTYPE html><html><head><title>page</title></head><body><h1>page</h1><p>ok</p></body></html>"


def start_proxy(kind: str) -> tuple[subprocess.Popen[str], int]:
    """A no-auth HTTP proxy on a free loopback port: pproxy (kit launcher) or proxy.py."""
    if kind == "pproxy":
        return start_pproxy()
    port = free_port()
    env = dict(os.environ)
    argv = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port), "--num-workers", "1"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{kind} did not start") from None
            time.sleep(0.05)
    raise SystemExit(f"{kind} did not accept connections")


# ---------------------------------------------------------------------------- one crawl (child process)


def crawl(variant: str, target: str, entries_file: str, pages: int) -> dict[str, Any]:
    from scrapy import Request, Spider, signals
    from scrapy.crawler import CrawlerProcess

    first = Path(entries_file).read_text().split("\n", 1)[0]
    static = variant == "static"

    class Bench(Spider):
        name = "bench"
        seen = 0

        async def start(self) -> Any:
            meta = {"proxy": first} if static else {}
            for i in range(pages):
                yield Request(f"{target}/page/{i}", meta=dict(meta), dont_filter=True)

        def parse(self, response: Any) -> None:
            type(self).seen += 1

    settings: dict[str, Any] = {
        "CONCURRENT_REQUESTS": 32,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 32,
        "DOWNLOAD_DELAY": 0,
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        "ROBOTSTXT_OBEY": False,
        "LOG_LEVEL": "ERROR",
    }
    if variant.startswith("pharox"):
        settings["DOWNLOADER_MIDDLEWARES"] = {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610}
        settings.update(PHAROX_PROXIES_FILE=entries_file, PHAROX_LOGSTATS_INTERVAL=0)
        settings["PHAROX_GC_FREEZE"] = variant == "pharox"
    elif variant == "rotating":
        settings["DOWNLOADER_MIDDLEWARES"] = {
            "rotating_proxies.middlewares.RotatingProxyMiddleware": 610,
            "rotating_proxies.middlewares.BanDetectionMiddleware": 620,
        }
        settings["ROTATING_PROXY_LIST_PATH"] = entries_file
        settings["ROTATING_PROXY_LOGSTATS_INTERVAL"] = 3600
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(Bench)
    cpu: list[float] = []

    def opened() -> None:
        cpu.append(time.process_time())

    crawler.signals.connect(opened, signal=signals.spider_opened)
    process.crawl(crawler)
    process.start()
    assert crawler.stats is not None
    stats = crawler.stats.get_stats()
    return {"pages": Bench.seen, "seconds": stats["elapsed_time_seconds"], "cpu": time.process_time() - cpu[0]}


def middleware_cost(entries: int, requests: int = 1000, batches: int = 7) -> float:
    """CPU µs per request of process_request + process_response alone (no network).

    The median of several batches after a warm-up one: a busy moment on a shared
    machine spoils one batch, not the figure.
    """
    from scrapy import Request
    from scrapy.http import HtmlResponse
    from scrapy.utils.test import get_crawler
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from pharox_integrations.scrapy import PharoxProxyMiddleware

    proxies = [f"http://u{i}:p{i}@127.0.0.1:9" for i in range(entries)]
    crawler = get_crawler(settings_dict={"PHAROX_PROXIES": proxies, "PHAROX_LOGSTATS_INTERVAL": 0})
    middleware = PharoxProxyMiddleware.from_crawler(crawler)

    async def run() -> float:
        batch = [Request(f"http://127.0.0.1:9/page/{i}") for i in range(requests)]
        start = time.process_time()
        for request in batch:  # the response is built in the loop, as in the figures quoted before
            await middleware.process_request(request)
            response = HtmlResponse(request.url, status=200, body=b"<html></html>", request=request)
            await middleware.process_response(request, response)
        return (time.process_time() - start) / requests * 1e6

    async def median() -> float:
        await run()  # warm-up batch (at 10,000 entries later batches still meet new proxies)
        return statistics.median([await run() for _ in range(batches)])

    import asyncio

    return asyncio.run(median())


def run_child(variant: str, target: str, entries_file: str, pages: int) -> tuple[float, float]:
    """(pages/s, crawler CPU ms per 100 pages) of one crawl in its own process."""
    argv = [sys.executable, __file__, "--child", variant, target, entries_file, str(pages)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{variant} crawl failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["pages"] != pages:
        raise SystemExit(f"{variant} crawl scraped {result['pages']} of {pages} pages")
    return result["pages"] / result["seconds"], result["cpu"] * 1000.0 * 100 / result["pages"]


# ---------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 pages, 1 crawl per row")
    parser.add_argument("--pages", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--proxy", choices=("pproxy", "proxypy"), default="pproxy")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "TARGET", "ENTRIES", "PAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, target, entries_file, pages = args.child
        if variant == "cost":
            print(json.dumps(middleware_cost(int(entries_file))))
        else:
            print(json.dumps(crawl(variant, target, entries_file, int(pages))))
        return
    pages = args.pages or (300 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 5)
    try:
        import rotating_proxies  # noqa: F401

        rows = [("static", 1), ("pharox", 10), ("pharox", 10_000), ("pharox-unfrozen", 10)]
        rows += [("rotating", 10), ("rotating", 10_000)]
    except ImportError:
        print("scrapy-rotating-proxies not installed (pip install -e '.[bench]'): its rows are skipped")
        rows = [("static", 1), ("pharox", 10), ("pharox", 10_000), ("pharox-unfrozen", 10)]
    target_proc, target = start_target(_PAGE, "text/html")
    proxy_proc, port = start_proxy(args.proxy)
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {row: [] for row in rows}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for n in sorted({n for _, n in rows}):
                path = Path(tmp) / f"entries-{n}.txt"
                path.write_text("\n".join(f"http://u{i}:p{i}@127.0.0.1:{port}" for i in range(n)))
                files[n] = str(path)
            for repeat in range(repeats):  # rows interleaved, so a busy moment hits every row alike
                for variant, n in rows:
                    rate, cpu = run_child(variant, target, files[n], pages)
                    runs[(variant, n)].append((rate, cpu))
                    print(
                        f"  run {repeat + 1}: {variant:<15} {n:>6} entries: {rate:4.0f} pages/s, {cpu:5.1f} ms CPU/100",
                        flush=True,
                    )
    finally:
        for proc in (proxy_proc, target_proc):
            proc.kill()
            proc.wait()
    names = {
        "static": "static meta['proxy']",
        "pharox": "PharoxProxyMiddleware",
        "pharox-unfrozen": "  PHAROX_GC_FREEZE off",
        "rotating": "scrapy-rotating-proxies",
    }
    medians = {
        row: (statistics.median(r for r, _ in got), statistics.median(c for _, c in got)) for row, got in runs.items()
    }
    costs = {}
    for n in (10, 10_000):
        argv = [sys.executable, __file__, "--child", "cost", "-", str(n), "0"]
        costs[n] = float(subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()[-1])
    base_rate, base_cpu = medians[rows[0]]
    print(f"\n{pages} pages per crawl, CONCURRENT_REQUESTS=32, proxy: {args.proxy}, median of {repeats}")
    print("CPU = the crawling process's CPU time from spider_opened to the end (less sensitive to a busy machine)")
    print(
        f"| {'setup':<26} | {'entries':>7} | {'pages/s':>7} | {'vs static':>9} "
        f"| {'CPU ms/100 pages':>16} | {'vs static':>9} |"
    )
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 18}|{'-' * 11}|")
    for (variant, n), (rate, cpu) in medians.items():
        print(
            f"| {names[variant]:<26} | {n:>7,} | {rate:>7.0f} | {rate / base_rate:>8.2f}x "
            f"| {cpu:>16.1f} | {cpu / base_cpu:>8.2f}x |"
        )

    print("\nPharoxProxyMiddleware alone (process_request + process_response, no network, CPU per request):")
    for n, cost in costs.items():
        print(f"  {n:>6,} entries: {cost:.0f} µs")


if __name__ == "__main__":
    main()
