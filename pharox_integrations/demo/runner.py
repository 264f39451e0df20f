"""`pharox-integrations demo`: start the local sites and proxies, run the worker, print the tables.

Two sites: the shop (127.0.0.1) and the outlet (127.0.0.2, or ``localhost`` where
127.0.0.x aliases cannot be bound).  Each bans a different proxy by the address it
connects from; since a ban is one site's verdict, each banned proxy stays active and
keeps serving the other site, which the per-site lines at the end show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..storage import safe_storage_url

if TYPE_CHECKING:
    from .proxies import DemoProxies

#: How the worker is started (`-m` would make it `__main__`, a second copy of the module
#: that `PHAROX_BROKER` could not reach).
_WORKER = "import sys; from pharox_integrations.demo.worker import main; sys.exit(main(sys.argv[1:]))"
_WORKER_TIMEOUT = 600.0

SHOP, OUTLET = "shop", "outlet"
#: A `DemoProxies` role as this demo names it (`serve` and the example project have one site).
_ROLE_IN_DEMO = {"banned by the site": "banned by the shop"}


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
    say("starting the demo shop, the demo outlet and 5 local proxies (proxy.py) ...")
    with (
        DemoProxies() as proxies,
        DemoSite(pages=pages, banned_ips=proxies.banned_ips) as shop,
        DemoSite(pages=pages, banned_ips=outlet_bans(proxies), host=outlet_host(), title="Demo outlet") as outlet,
    ):
        roles = demo_roles(proxies)
        for p in proxies.items:
            say(f"  {p.safe_url:<24} {roles[p.safe_url]}")
        sites = {SHOP: shop, OUTLET: outlet}
        for name, site in sites.items():
            say(f"  demo {name:<6} {site.url} ({pages} products; it answers 403 to the proxy 'banned by the {name}')")
        say("running the Scrapy crawl, then the requests and the urllib3 examples, on both sites through one pool:")
        with tempfile.TemporaryDirectory(prefix="pharox-demo-run-") as tmp:
            config_path = Path(tmp) / "config.json"
            report_path = Path(tmp) / "report.json"
            config = {
                "storage_url": storage_url,
                "pool": pool,
                "proxies": [p.url for p in proxies.items],
                "sites": {name: site.url for name, site in sites.items()},
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
        source_ips = {p.safe_url: p.source_ip for p in proxies.items}
        served = {name: served_by(site.hits, source_ips) for name, site in sites.items()}
        auth_seen = sum(site.proxy_auth_seen for site in sites.values())
        banned_by = {
            name: next(p.safe_url for p in proxies.items if p.source_ip in site.banned_ips)
            for name, site in sites.items()
        }
        outcome = check(report, pages=pages, site_auth_seen=auth_seen, banned_by=banned_by, served=served)
        if not storage_url.startswith(("memory:", "pharox-memory:")):
            outcome.problems.extend(_storage_leases(storage_url, pool))
        say("")
        say(render_table(report, roles, served))
        say("")
        for line in render_sites(report, served):
            say(line)
        say("")
        say(summary(report, auth_seen))
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


def outlet_host() -> str:
    """Where the outlet listens: a second loopback address, so it is a site of its own
    (an IP address is its own site); ``localhost`` where 127.0.0.x cannot be bound."""
    from .proxies import loopback_aliases_work

    return "127.0.0.2" if loopback_aliases_work() else "localhost"


def outlet_bans(proxies: DemoProxies) -> set[str]:
    """The outlet bans the second plain proxy (one the shop keeps using)."""
    plain = [p.source_ip for p in proxies.items if p.role == "plain" and p.source_ip]
    return set(plain[-1:])


def demo_roles(proxies: DemoProxies) -> dict[str, str]:
    """Each proxy's role in the demo, by its URL without credentials."""
    outlet = outlet_bans(proxies)
    return {
        p.safe_url: f"banned by the {OUTLET}" if p.source_ip in outlet else _ROLE_IN_DEMO.get(p.role, p.role)
        for p in proxies.items
    }


def served_by(hits: Mapping[str, int], source_ips: Mapping[str, str | None]) -> dict[str, int]:
    """Requests a site received from each proxy (by proxy URL), from its hits by address."""
    return {url: hits.get(ip, 0) if ip else 0 for url, ip in source_ips.items()}


def check(
    report: dict[str, Any],
    *,
    pages: int,
    site_auth_seen: int,
    banned_by: Mapping[str, str] | None = None,
    served: Mapping[str, Mapping[str, int]] | None = None,
) -> DemoOutcome:
    """Every promise of the demo, as a list of broken ones.

    `banned_by`: the proxy (URL) each site bans; it must be held off that site only,
    stay active, and serve another site.  `served`: requests each site received from
    each proxy."""
    problems: list[str] = []
    if report.get("held"):
        problems.append(f"{report['held']} lease(s) still held by the worker's broker at the end")
    if report.get("released_at_close"):
        problems.append(f"broker.close() had to release {report['released_at_close']} lease(s)")
    for row in report.get("proxies", []):
        if row["current_leases"]:
            problems.append(f"{row['url']} still counts {row['current_leases']} lease(s) in the storage")
    expected = list(range(1, pages + 1))
    names = list(report.get("sites", {})) or [SHOP]
    crawl = report.get("scrapy", {})
    for name in names:
        got = crawl.get("items", {}).get(name, [])
        if got != expected:
            problems.append(f"the crawl scraped {len(got)} of the {name}'s {pages} products")
    for client in ("requests", "urllib3"):
        run = report.get(client, {})
        for name in names:
            got = run.get("ids", {}).get(name, [])
            if got != expected:
                problems.append(f"{client} fetched {len(got)} of the {name}'s {pages} products: {run.get('errors')}")
    if site_auth_seen:
        problems.append(f"the sites received Proxy-Authorization {site_auth_seen} time(s)")
    status = {row["url"]: row["status"] for row in report.get("proxies", [])}
    for name, proxy in (banned_by or {}).items():
        standing = report.get("sites", {}).get(name, {})
        if not any(h["proxy"] == proxy and h["kind"] == "ban" for h in standing.get("holds", [])):
            refused = (served or {}).get(name, {}).get(proxy, 0)
            problems.append(f"the {name} holds no ban on {proxy} (it answered that proxy 403 {refused} time(s))")
        if status.get(proxy) != "active":
            problems.append(f"{proxy}, banned by the {name} only, is {status.get(proxy)} for every site")
        elsewhere = sum(hits.get(proxy, 0) for other, hits in (served or {}).items() if other != name)
        if served and not elsewhere:
            problems.append(f"{proxy}, banned by the {name} only, served no other site")
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


def render_table(report: dict[str, Any], roles: dict[str, str], served: Mapping[str, Mapping[str, int]]) -> str:
    """The per-proxy table: what each proxy did, what each site received from it, and
    whether it holds a lease."""
    head = ("proxy", "role", "status", "requests", *served, "bans", "failures", "median ms", "leases held")
    rows = [head]
    order = list(roles)
    for row in sorted(report["proxies"], key=lambda r: order.index(r["url"]) if r["url"] in order else len(order)):
        rows.append(
            (
                row["url"],
                roles.get(row["url"], "?"),
                row["status"],
                str(row["requests"]),
                *(str(hits.get(row["url"], 0)) for hits in served.values()),
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


def render_sites(report: dict[str, Any], served: Mapping[str, Mapping[str, int]]) -> list[str]:
    """A few lines per site: how many proxies it may use, then each proxy it holds off,
    why and for how long, and for a ban what that proxy did meanwhile (its status and
    the requests it delivered to the other sites)."""
    status = {row["url"]: row["status"] for row in report["proxies"]}
    lines = ["per site (a ban is one site's verdict on a proxy; the proxy stays in the pool for the others):"]
    sites = report.get("sites", {})
    width = max((len(name) for name in sites), default=0)
    for name, standing in sites.items():
        lines.append(
            f"  {name:<{width}}  site {standing['site']}: {standing['usable']} of {standing['active']} "
            f"active proxies usable, {standing['banned']} banned there, {standing['cooling']} cooling"
        )
        indent = " " * (width + 4)
        for hold in standing["holds"]:
            proxy = hold["proxy"]
            if hold["kind"] != "ban":
                lines.append(f"{indent}{hold['kind']}: {proxy} for {hold['seconds']:.0f} s")
                continue
            elsewhere = [
                f"the {other} {_requests(hits.get(proxy, 0))}" for other, hits in served.items() if other != name
            ]
            lines.append(
                f"{indent}bans {proxy} for {hold['seconds']:.0f} s (strike {hold['strikes']}); "
                f"it stayed {status.get(proxy, '?')} and served " + (", ".join(elsewhere) or "no other site")
            )
    return lines


def _requests(n: int) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"


def summary(report: dict[str, Any], site_auth_seen: int) -> str:
    c = report["counters"]
    crawl = report["scrapy"]

    def count(ids: Mapping[str, list[int]]) -> str:
        return " + ".join(str(len(v)) for v in ids.values())

    names = " + ".join(report.get("sites", crawl["items"]))
    return (
        f"scrapy {count(crawl['items'])} items, requests {count(report['requests']['ids'])}, "
        f"urllib3 {count(report['urllib3']['ids'])} products ({names}) in {report['seconds']:.1f} s; "
        f"leases {c['acquired']} taken / {c['released']} returned, held now {report['held']}; "
        f"Proxy-Authorization seen by the sites: {site_auth_seen}"
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
