"""`pharox-integrations demo`: start the local site and proxies, run the worker, print the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..storage import safe_storage_url

#: How the worker is started (`-m` would make it `__main__`, a second copy of the module
#: that `PHAROX_BROKER` could not reach).
_WORKER = "import sys; from pharox_integrations.demo.worker import main; sys.exit(main(sys.argv[1:]))"
_WORKER_TIMEOUT = 600.0


@dataclass(frozen=True)
class DemoOutcome:
    """The worker's report and every check the demo makes on it."""

    report: dict[str, Any]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def run_demo(
    storage_url: str = "memory://",
    *,
    pages: int = 24,
    pool: str = "pharox-demo",
    out: TextIO | None = None,
) -> int:
    """Run the demo; returns the exit code (0 all good, 1 a check failed)."""
    stream = out or sys.stdout
    from .proxies import DemoProxies
    from .site import DemoSite

    say = _printer(stream)
    say(f"pharox-integrations demo: storage {safe_storage_url(storage_url)}, pool {pool!r}")
    say("starting the demo site and 5 local proxies (proxy.py) ...")
    with DemoProxies() as proxies, DemoSite(pages=pages, banned_ips=proxies.banned_ips) as site:
        roles = {p.safe_url: p.role for p in proxies.items}
        for p in proxies.items:
            say(f"  {p.safe_url:<24} {p.role}")
        say(f"  demo site {site.url} ({pages} products; it answers 403 to the proxy 'banned by the site')")
        say("running the Scrapy crawl, then the requests and the urllib3 examples, through one pool:")
        with tempfile.TemporaryDirectory(prefix="pharox-demo-run-") as tmp:
            config_path = Path(tmp) / "config.json"
            report_path = Path(tmp) / "report.json"
            config = {
                "storage_url": storage_url,
                "pool": pool,
                "proxies": [p.url for p in proxies.items],
                "site_url": site.url,
                "pages": pages,
                "report": str(report_path),
            }
            # Holds the demo proxies' credentials: readable by this user only.
            fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(config, fh)
            code = _run_worker(config_path, stream)
            if code != 0 or not report_path.exists():
                say(f"demo worker failed (exit code {code}); see the messages above")
                return 1
            report = json.loads(report_path.read_text(encoding="utf-8"))
        outcome = check(report, pages=pages, site_auth_seen=site.proxy_auth_seen)
        if not storage_url.startswith(("memory:", "pharox-memory:")):
            outcome.problems.extend(_storage_leases(storage_url, pool))
        say("")
        say(render_table(report, roles, site.hits, proxies_source_ips={p.safe_url: p.source_ip for p in proxies.items}))
        say("")
        say(summary(report, site.proxy_auth_seen))
        for problem in outcome.problems:
            say(f"PROBLEM: {problem}")
        say("demo OK: every lease returned" if outcome.ok else "demo FAILED")
        return 0 if outcome.ok else 1


def _printer(stream: TextIO) -> Any:
    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    return say


def _run_worker(config_path: Path, stream: TextIO) -> int:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("SCRAPY_SETTINGS_MODULE", None)  # the worker's crawl brings its own settings
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    # A hung worker must not hang the demo: past the time limit it is killed, its
    # output ends and the demo reports the failure (and still stops the proxies).
    watchdog = threading.Timer(_WORKER_TIMEOUT, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        for line in proc.stdout:
            stream.write(line)
            stream.flush()
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        watchdog.cancel()


def check(report: dict[str, Any], *, pages: int, site_auth_seen: int) -> DemoOutcome:
    """Every promise of the demo, as a list of broken ones."""
    problems: list[str] = []
    if report.get("held"):
        problems.append(f"{report['held']} lease(s) still held by the worker's broker at the end")
    if report.get("released_at_close"):
        problems.append(f"broker.close() had to release {report['released_at_close']} lease(s)")
    for row in report.get("proxies", []):
        if row["current_leases"]:
            problems.append(f"{row['url']} still counts {row['current_leases']} lease(s) in the storage")
    expected = list(range(1, pages + 1))
    crawl = report.get("scrapy", {})
    if crawl.get("items") != expected:
        problems.append(f"the crawl scraped {len(crawl.get('items', []))} of {pages} products")
    for client in ("requests", "urllib3"):
        run = report.get(client, {})
        if run.get("ids") != expected:
            problems.append(f"{client} fetched {len(run.get('ids', []))} of {pages} products: {run.get('errors')}")
    if site_auth_seen:
        problems.append(f"the site received Proxy-Authorization {site_auth_seen} time(s)")
    return DemoOutcome(report, problems)


def _storage_leases(storage_url: str, pool: str) -> list[str]:
    """Ask the shared storage itself (not the worker) whether a lease is left."""
    from pharox import ProxyManager

    from ..broker import LeaseBroker
    from ..storage import storage_from_url

    storage = storage_from_url(storage_url)
    try:
        broker = LeaseBroker(ProxyManager(storage), pool=pool)
        return [
            f"the storage still counts {p.current_leases} lease(s) on {p.host}:{p.port}"
            for p in broker.proxies(pool)
            if p.current_leases
        ]
    finally:
        close = getattr(storage, "close", None)
        if callable(close):
            close()


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render_table(
    report: dict[str, Any],
    roles: dict[str, str],
    site_hits: Any,
    proxies_source_ips: dict[str, str | None],
) -> str:
    """The per-proxy table: what each proxy did and whether it holds a lease."""
    head = ("proxy", "role", "status", "requests", "served", "bans", "failures", "median ms", "leases held")
    rows = [head]
    order = list(roles)
    for row in sorted(report["proxies"], key=lambda r: order.index(r["url"]) if r["url"] in order else len(order)):
        ip = proxies_source_ips.get(row["url"])
        rows.append(
            (
                row["url"],
                roles.get(row["url"], "?"),
                row["status"],
                str(row["requests"]),
                str(site_hits.get(ip, 0) if ip else 0),
                str(row["bans"]),
                str(row["failures"]),
                _cell(row["median_latency_ms"], "{:.0f}"),
                str(row["current_leases"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(report: dict[str, Any], site_auth_seen: int) -> str:
    c = report["counters"]
    crawl = report["scrapy"]
    return (
        f"scrapy {len(crawl['items'])} items, requests {len(report['requests']['ids'])}, "
        f"urllib3 {len(report['urllib3']['ids'])} products in {report['seconds']:.1f} s; "
        f"leases {c['acquired']} taken / {c['released']} returned, held now {report['held']}; "
        f"Proxy-Authorization seen by the site: {site_auth_seen}"
    )


def serve(
    *,
    pages: int = 24,
    site_port: int = 0,
    proxies_file: Path | None = None,
    out: TextIO | None = None,
    ready: Any = None,
) -> int:
    """Keep the demo site and proxies running (for the example project) until interrupted.

    Writes the proxy list to `proxies_file` (mode 0600: one proxy has credentials) so
    `PHAROX_PROXIES_FILE` can point at it.  `ready`, if given, is a `threading.Event`
    to wait on instead of Ctrl-C (tests stop the server with it).
    """
    from .proxies import DemoProxies
    from .site import DemoSite

    say = _printer(out or sys.stdout)
    with DemoProxies() as proxies, DemoSite(pages=pages, banned_ips=proxies.banned_ips, port=site_port) as site:
        lines = [f"# pharox-integrations demo proxies ({p.role})\n{p.url}" for p in proxies.items]
        if proxies_file is not None:
            fd = os.open(proxies_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
        say(f"demo site: {site.url}  ({pages} products)")
        for p in proxies.items:
            say(f"  proxy {p.safe_url:<24} {p.role}")
        if proxies_file is not None:
            say(f"proxy list written to {proxies_file}")
        stop = ready if ready is not None else threading.Event()
        try:
            say("press Ctrl-C to stop")  # inside the try: a signal right after it still stops cleanly
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            say("stopping")
    return 0
