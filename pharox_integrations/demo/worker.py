"""The demo's worker process: the Scrapy crawl, then requests and urllib3, through ONE broker.

Every door works on both demo sites at once (the shop and the outlet), so the report
shows per-site standing: each site bans its own proxy, which stays in the pool and
serves the other site.

Why one process: the pool has to be shared by the three doors whatever the storage.
`memory://` (the default) lives in one process, so the crawl and the two client
examples run here, one after the other, on the same `LeaseBroker` (Scrapy reaches it
through `PHAROX_BROKER`).  Why a child of the `demo` command and not the command
itself: Scrapy installs a reactor, signal handlers and log handlers for its process;
keeping them out of the command lets it stop the proxies and print the table whatever
happens here.  The result goes back as a JSON report (no credentials in it).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..broker import LeaseBroker
from ..errors import NoProxyAvailable

_BROKER: LeaseBroker | None = None


def shared_broker() -> LeaseBroker:
    """What `PHAROX_BROKER` names in the crawl settings: the worker's own broker."""
    if _BROKER is None:
        raise RuntimeError("the demo worker has not built its broker yet")
    return _BROKER


@dataclass
class Progress:
    """Counts the phases update; a thread prints them while the demo works."""

    phase: str = "starting"
    done: int = 0
    total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, phase: str, total: int) -> None:
        with self.lock:
            self.phase, self.done, self.total = phase, 0, total

    def tick(self) -> None:
        with self.lock:
            self.done += 1


def _progress_line(progress: Progress, broker: LeaseBroker) -> str:
    c = broker.counters
    return (
        f"  {progress.phase:<8} {progress.done:>3}/{progress.total:<3} "
        f"leases {c['acquired']} taken, {c['released']} returned, {broker.held} held | "
        f"bans {c['bans']} ({c['site_bans']} held per site) | failures {c['failures']} | benched {c['benched']}"
    )


def _show_progress(progress: Progress, broker: LeaseBroker, stop: threading.Event) -> None:
    """One line per second while something changes (a log file stays readable)."""
    last = ""
    while not stop.wait(1.0):
        line = _progress_line(progress, broker)
        if progress.total and line != last:
            print(line, flush=True)
            last = line


def _seed(broker: LeaseBroker, pool: str, proxies: list[str]) -> None:
    """Start from a clean demo pool: a shared storage may hold an earlier run's ports."""
    try:
        old = broker.proxies(pool)
    except NoProxyAvailable:  # the pool does not exist yet
        old = []
    for proxy in old:
        broker.remove_proxy(proxy.id, pool=pool)
    broker.add_proxies(proxies, pool=pool)


def _crawl(sites: dict[str, str], progress: Progress, pages: int) -> dict[str, Any]:
    from scrapy import signals
    from scrapy.crawler import CrawlerProcess

    from .spider import DemoShopSpider

    process = CrawlerProcess(
        {
            "DOWNLOADER_MIDDLEWARES": {"pharox_integrations.scrapy.PharoxProxyMiddleware": 610},
            "PHAROX_BROKER": "pharox_integrations.demo.worker.shared_broker",
            "PHAROX_LOGSTATS_INTERVAL": 0,
            "ROBOTSTXT_OBEY": False,
            "TELNETCONSOLE_ENABLED": False,
            "CONCURRENT_REQUESTS": 8,
            "DOWNLOAD_TIMEOUT": 10,
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "  ! %(name)s: %(message)s",
        }
    )
    items: list[dict[str, Any]] = []

    def scraped(item: dict[str, Any], **_: Any) -> None:
        items.append(dict(item))
        progress.tick()

    crawler = process.create_crawler(DemoShopSpider)
    crawler.signals.connect(scraped, signal=signals.item_scraped)
    progress.start("scrapy", pages * len(sites))
    process.crawl(crawler, site_url=",".join(sites.values()))
    process.start()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    by_site: dict[str, list[int]] = {name: [] for name in sites}
    for item in items:
        url = str(item["url"])
        name = next((n for n, site_url in sites.items() if url.startswith(site_url + "/")), None)
        if name is not None:
            by_site[name].append(int(url.rsplit("/", 1)[-1]))
    return {
        "items": {name: sorted(ids) for name, ids in by_site.items()},
        "finish_reason": str(stats.get("finish_reason", "")),
        "errors": int(stats.get("log_count/ERROR", 0)),
    }


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Build the broker, run the three doors, return the report."""
    global _BROKER
    from .clients import run_requests, run_urllib3

    pool = str(config["pool"])
    sites = {str(name): str(url) for name, url in config["sites"].items()}
    pages = int(config["pages"])
    storage_url = str(config["storage_url"])
    if not storage_url.startswith(("memory:", "pharox-memory:")):
        from ..storage.sql import init_schema

        init_schema(storage_url)  # idempotent: the demo works on an empty database
    broker = LeaseBroker.from_settings(
        {
            "PHAROX_STORAGE_URL": storage_url,
            "PHAROX_POOL": pool,
            "PHAROX_PROXIES": list(config["proxies"]),
            "PHAROX_ACQUIRE_TIMEOUT": 15,
            "PHAROX_MAX_FAILURES": 2,
            "PHAROX_LEASE_SECONDS": 120,
            # Benched proxies sit out the whole run, however slow the machine: the
            # table then shows what the site and the dead port did to them.
            "PHAROX_BACKOFF_BASE": 600,
        }
    )
    _BROKER = broker
    _seed(broker, pool, list(config["proxies"]))
    progress = Progress()
    stop = threading.Event()
    ticker = threading.Thread(target=_show_progress, args=(progress, broker, stop), daemon=True)
    ticker.start()
    report: dict[str, Any] = {"pool": pool}
    started = time.monotonic()
    try:
        report["scrapy"] = _crawl(sites, progress, pages)
        print(_progress_line(progress, broker), flush=True)  # each phase ends with its line
        for name, fn in (("requests", run_requests), ("urllib3", run_urllib3)):
            progress.start(name, pages * len(sites))
            result = fn(broker, sites, pages, done=progress.tick)
            report[name] = asdict(result)
            print(_progress_line(progress, broker), flush=True)
    finally:
        stop.set()
        ticker.join()
    report["seconds"] = round(time.monotonic() - started, 2)
    report["held"] = broker.held
    report["counters"] = dict(broker.counters)
    # Closed first: the lease block gives back the slots kept for the next request, so
    # the storage's counts below are what a finished worker leaves behind.
    report["released_at_close"] = broker.close()
    report["proxies"] = [
        {
            "url": str(_safe(proxy)),
            "status": str(getattr(proxy.status, "value", proxy.status)),
            "current_leases": proxy.current_leases,
            **broker.proxy_stats(proxy.id),
        }
        for proxy in broker.proxies(pool)
    ]
    report["sites"] = _standing(broker, pool, sites)
    return report


def _standing(broker: LeaseBroker, pool: str, sites: dict[str, str]) -> dict[str, Any]:
    """Each site's standing of the pool at the end: its key, how many proxies it may
    use, and the holds it has on proxies (which, why, for how long)."""
    urls = {p.id: _safe(p) for p in broker.proxies(pool)}
    now = time.time()
    standing: dict[str, Any] = {}
    for name, url in sites.items():
        health = broker.health(pool, site=url)
        standing[name] = {
            "url": url,
            "site": health.site,
            "active": health.active,
            "usable": health.site_usable,
            "banned": health.site_banned,
            "cooling": health.site_cooling,
            "holds": [
                {
                    "proxy": urls[proxy_id],
                    "kind": hold.kind,
                    "seconds": round(max(0.0, hold.until - now), 1),
                    "strikes": hold.strikes,
                }
                for proxy_id, _, hold in broker.sites.in_force(health.site)
                if proxy_id in urls  # not a proxy an earlier run left (gone from the pool)
            ],
        }
    return standing


def _safe(proxy: Any) -> str:
    return f"{getattr(proxy.protocol, 'value', proxy.protocol)}://{proxy.host}:{proxy.port}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    report = run(config)
    Path(config["report"]).write_text(json.dumps(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
