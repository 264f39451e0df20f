"""`pharox-integrations demo`: the README's main job, run for real end to end.

Real proxy.py processes, the real demo sites (the shop and the outlet, each banning a
different proxy), Scrapy + requests + urllib3 in the worker process; the test reads what
a user reads (the tables, the per-site lines and the exit code) and then asks the
storage itself whether a lease was left behind and which bans it holds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pharox import ProxyManager
from sqlhelpers import private_database

from pharox_integrations.broker import LeaseBroker
from pharox_integrations.demo.proxies import DemoProxies, loopback_aliases_work
from pharox_integrations.demo.runner import check
from pharox_integrations.storage import storage_from_url

DEMO_PASSWORD = "s3cret-pass"  # the demo's proxy credentials (see DemoProxies)
ROLES = ("plain", "banned by the outlet", "credentials", "banned by the shop", "dead port")
SITES = ("shop", "outlet")
_ROLE = re.compile(r"(\S+)\s+(plain|credentials|banned by the shop|banned by the outlet|dead port)\s+(.*)$")
_SITE = re.compile(
    r"  (shop|outlet)\s+site (\S+): (\d+) of (\d+) active proxies usable, (\d+) banned there, (\d+) cooling$"
)
_BAN = re.compile(
    r"\s+bans (\S+) for (\d+) s \(strike (\d+)\); it stayed (\w+) and served the (shop|outlet) (\d+) requests?$"
)


def _demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(
        [sys.executable, "-m", "pharox_integrations.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _table(output: str) -> dict[str, dict[str, str]]:
    """The per-proxy table, by role: {role: {column: value}}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("proxy ") and "leases held" in line)
    assert lines[start].split()[4:6] == list(SITES), lines[start]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        match = _ROLE.match(line)
        assert match, line
        status, requests, shop, outlet, bans, failures, median, held = match.group(3).split()
        rows[match.group(2)] = {
            "url": match.group(1),
            "status": status,
            "requests": requests,
            "shop": shop,
            "outlet": outlet,
            "bans": bans,
            "failures": failures,
            "median": median,
            "held": held,
        }
    return rows


@dataclass
class _SiteLines:
    """One site's per-site lines: its summary, and one entry per proxy it bans."""

    key: str
    usable: int
    active: int
    banned: int
    cooling: int
    bans: list[dict[str, Any]] = field(default_factory=list)


def _sites(output: str) -> dict[str, _SiteLines]:
    """The per-site lines, by site name."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per site "))
    found: dict[str, _SiteLines] = {}
    current: _SiteLines | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        site = _SITE.match(line)
        if site:
            name, key, usable, active, banned, cooling = site.groups()
            current = found[name] = _SiteLines(key, int(usable), int(active), int(banned), int(cooling))
            continue
        ban = _BAN.match(line)
        assert ban and current is not None, line
        url, seconds, strikes, status, other, served = ban.groups()
        current.bans.append(
            {"url": url, "seconds": int(seconds), "strikes": int(strikes), "status": status, other: int(served)}
        )
    return found


def _assert_demo_ok(done: subprocess.CompletedProcess[str], pages: int) -> dict[str, dict[str, str]]:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "demo OK: every lease returned" in output
    assert "PROBLEM" not in output
    assert DEMO_PASSWORD not in output  # the credentials proxy never shows its secret
    both = f"{pages} + {pages}"
    assert f"scrapy {both} items, requests {both}, urllib3 {both} products (shop + outlet)" in output
    assert "Proxy-Authorization seen by the sites: 0" in output
    assert re.search(r"scrapy\s+\d+/\d+", output), "no progress line"
    rows = _table(output)
    assert sorted(rows) == sorted(ROLES)
    assert all(row["held"] == "0" for row in rows.values())
    assert rows["dead port"]["status"] == "inactive"
    assert rows["dead port"]["shop"] == rows["dead port"]["outlet"] == "0"
    assert int(rows["dead port"]["failures"]) >= 1
    # A ban is one site's verdict: every proxy that answers stays active, the two
    # banned ones included, and each served the site that does not ban it.
    for role in ("plain", "credentials", "banned by the shop", "banned by the outlet"):
        assert rows[role]["status"] == "active", rows[role]
        assert rows[role]["median"] != "-"
    for site, other in (("shop", "outlet"), ("outlet", "shop")):
        banned = rows[f"banned by the {site}"]
        # Its only bans are that site's 403s (each one judged once), none from the other.
        assert int(banned[site]) >= 1 and banned["bans"] == banned[site]
        assert int(banned[other]) > 0
        # Each site got every product through every door plus its index, from the
        # proxies it does not ban (the outlet's requests all reached the outlet).
        assert sum(int(r[site]) for role, r in rows.items() if role != f"banned by the {site}") == 3 * pages + 1
    sites = _sites(output)
    assert sorted(sites) == sorted(SITES)
    assert sites["shop"].key == "127.0.0.1"
    assert sites["outlet"].key == ("127.0.0.2" if loopback_aliases_work() else "localhost")
    for site, other in (("shop", "outlet"), ("outlet", "shop")):
        standing = sites[site]
        assert (standing.usable, standing.active, standing.banned, standing.cooling) == (3, 4, 1, 0)
        [ban] = standing.bans
        banned = rows[f"banned by the {site}"]
        assert ban["url"] == banned["url"]
        assert ban["status"] == "active"
        assert ban[other] == int(banned[other])  # what the table says that proxy served the other site
        assert 1 <= ban["strikes"] <= int(banned["bans"])
        assert 500 <= ban["seconds"] <= 1800  # PHAROX_BACKOFF_BASE 600, capped at the default backoff cap
    return rows


def test_demo_in_memory() -> None:
    _assert_demo_ok(_demo("--pages", "12"), pages=12)


def test_demo_on_sqlite_leaves_no_lease_in_the_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    rows = _assert_demo_ok(_demo("--storage", url, "--pages", "10"), pages=10)
    storage = storage_from_url(url)
    try:
        pool = next(p for p in storage.list_pools() if p.name == "pharox-demo")
        proxies = list(storage.list_proxies(str(pool.id)))
        assert len(proxies) == 5
        assert all(p.current_leases == 0 for p in proxies)
        assert sorted(str(p.status.value) for p in proxies) == ["active", "active", "active", "active", "inactive"]
        # The two bans are in the file's pxi_site_holds, seen by this other process.
        broker = LeaseBroker(ProxyManager(storage), pool="pharox-demo")
        ports = {p.id: p.port for p in proxies}
        held = sorted((site, ports[pid], hold.kind) for pid, site, hold in broker.sites.in_force())
        outlet = "127.0.0.2" if loopback_aliases_work() else "localhost"
        expected = [("127.0.0.1", _port(rows["banned by the shop"]), "ban")]
        expected.append((outlet, _port(rows["banned by the outlet"]), "ban"))
        assert held == sorted(expected)
        assert broker.health(site=outlet).site_usable == 3
        broker.close()
    finally:
        storage.close()  # type: ignore[attr-defined]
    # A second run on the same file starts from a clean demo pool (new ports).
    _assert_demo_ok(_demo("--storage", url, "--pages", "6"), pages=6)


@pytest.mark.postgres
def test_demo_on_postgresql(tmp_path: Path) -> None:
    with private_database("postgres", tmp_path) as url:
        _assert_demo_ok(_demo("--storage", url, "--pages", "8"), pages=8)


def _port(row: dict[str, str]) -> int:
    return int(row["url"].rsplit(":", 1)[1])


def test_demo_fails_loudly_when_the_worker_cannot_work(tmp_path: Path) -> None:
    # A real fault: the SQLite file cannot be created, so the worker stops at start-up.
    done = _demo("--storage", f"sqlite:///{tmp_path}/no/such/dir/demo.db", "--pages", "4")
    assert done.returncode == 1
    assert "demo worker failed" in done.stdout
    assert DEMO_PASSWORD not in done.stdout + done.stderr


def test_demo_rejects_a_bad_storage_url_before_starting_anything() -> None:
    done = _demo("--storage", "nosuch://x")
    assert done.returncode == 2
    assert "unknown storage URL" in done.stderr
    assert "starting" not in done.stdout


def test_check_reports_every_leak() -> None:
    expected = list(range(1, 4))
    both = {"shop": expected, "outlet": expected}
    proxy = "http://127.0.0.1:1"
    report = {
        "held": 1,
        "released_at_close": 1,
        "proxies": [{"url": proxy, "current_leases": 2, "status": "banned"}],
        "scrapy": {"items": both},
        "requests": {"ids": both, "errors": []},
        "urllib3": {"ids": {"shop": expected, "outlet": expected[:2]}, "errors": ["outlet page 3: ProxyError"]},
        "sites": {"shop": {"holds": []}, "outlet": {"holds": []}},
    }
    served = {"shop": {proxy: 2}, "outlet": {proxy: 0}}
    outcome = check(report, pages=3, site_auth_seen=1, banned_by={"shop": proxy}, served=served)
    assert not outcome.ok
    text = "\n".join(outcome.problems)
    assert "1 lease(s) still held" in text
    assert "still counts 2 lease(s)" in text
    assert "urllib3 fetched 2 of the outlet's 3 products" in text
    assert "Proxy-Authorization 1 time(s)" in text
    assert f"the shop holds no ban on {proxy} (it answered that proxy 403 2 time(s))" in text
    assert f"{proxy}, banned by the shop only, is banned for every site" in text
    assert f"{proxy}, banned by the shop only, served no other site" in text
    clean = {
        **report,
        "held": 0,
        "released_at_close": 0,
        "proxies": [{"url": proxy, "current_leases": 0, "status": "active"}],
        "urllib3": {"ids": both},
        "sites": {"shop": {"holds": [{"proxy": proxy, "kind": "ban"}]}, "outlet": {"holds": []}},
    }
    served_ok = {"shop": {proxy: 2}, "outlet": {proxy: 5}}
    assert check(clean, pages=3, site_auth_seen=0, banned_by={"shop": proxy}, served=served_ok).ok


def test_serve_writes_the_proxy_list_and_stops_its_proxies(tmp_path: Path) -> None:
    listing = tmp_path / "proxies.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pharox_integrations.cli", "demo", "--serve", "--proxies-file", str(listing)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "press Ctrl-C" in line:
                break
        output = "".join(seen)
        assert "demo site: http://127.0.0.1:" in output, output
        assert DEMO_PASSWORD not in output
        assert listing.stat().st_mode & 0o777 == 0o600  # it holds the credentials
        urls = [ln for ln in listing.read_text().splitlines() if ln and not ln.startswith("#")]
        assert len(urls) == 5 and sum(DEMO_PASSWORD in u for u in urls) == 1
        ports = [int(u.rsplit(":", 1)[1]) for u in urls]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Every proxy.py process is gone: nothing accepts on their ports any more.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_accepts(p) for p in ports):
        time.sleep(0.2)
    assert not any(_accepts(p) for p in ports)


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def test_demo_proxies_start_and_stop_cleanly() -> None:
    with DemoProxies() as proxies:
        live = [p.port for p in proxies.items if not p.dead]
        assert all(_accepts(p) for p in live)
        assert not _accepts(next(p.port for p in proxies.items if p.dead))
        assert all(DEMO_PASSWORD not in repr(p) for p in proxies.items)
    assert not any(_accepts(p) for p in live)


def test_site_tells_proxies_apart_without_loopback_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    from pharox_integrations.demo import proxies as demo_proxies
    from pharox_integrations.demo.site import DemoSite

    # Patched: macOS cannot bind 127.0.0.x without an alias, Linux always can, so the
    # other platforms' path (the X-Demo-Via label alone) is forced here.
    monkeypatch.setattr(demo_proxies, "loopback_aliases_work", lambda: False)
    with DemoProxies() as proxies, DemoSite(pages=2, banned_ips=proxies.banned_ips) as site:
        codes = {}
        for proxy in proxies.items:
            if proxy.dead:
                continue
            answer = requests.get(f"{site.url}/api/items?page=1", proxies={"http": proxy.url}, timeout=10)
            codes[proxy.role] = answer.status_code
        assert codes == {"plain": 200, "credentials": 200, "banned by the site": 403}
        assert set(site.hits) == {p.source_ip for p in proxies.items if not p.dead}  # labels, not 127.0.0.1
        assert site.proxy_auth_seen == 0
