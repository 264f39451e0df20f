"""`pharox-integrations demo`: the README's main job, run for real end to end.

Real proxy.py processes, the real demo site, Scrapy + requests + urllib3 in the worker
process; the test reads what a user reads (the table and the exit code) and then asks
the storage itself whether a lease was left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlhelpers import private_database

from pharox_integrations.demo.proxies import DemoProxies
from pharox_integrations.demo.runner import check
from pharox_integrations.storage import storage_from_url

DEMO_PASSWORD = "s3cret-pass"  # the demo's proxy credentials (see DemoProxies)
ROLES = ("plain", "plain", "credentials", "banned by the site", "dead port")


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
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        match = re.match(r"(\S+)\s+(plain|credentials|banned by the site|dead port)\s+(.*)$", line)
        assert match, line
        status, requests, served, bans, failures, median, held = match.group(3).split()
        key = match.group(2) if match.group(2) not in rows else f"{match.group(2)} 2"
        rows[key] = {
            "url": match.group(1),
            "status": status,
            "requests": requests,
            "served": served,
            "bans": bans,
            "failures": failures,
            "median": median,
            "held": held,
        }
    return rows


def _assert_demo_ok(done: subprocess.CompletedProcess[str], pages: int) -> dict[str, dict[str, str]]:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "demo OK: every lease returned" in output
    assert "PROBLEM" not in output
    assert DEMO_PASSWORD not in output  # the credentials proxy never shows its secret
    assert f"scrapy {pages} items, requests {pages}, urllib3 {pages} products" in output
    assert "Proxy-Authorization seen by the site: 0" in output
    assert re.search(r"scrapy\s+\d+/\d+", output), "no progress line"
    rows = _table(output)
    assert sorted(r.split(" 2")[0] for r in rows) == sorted(ROLES)
    assert all(row["held"] == "0" for row in rows.values())
    assert rows["banned by the site"]["status"] == "banned"
    assert int(rows["banned by the site"]["bans"]) >= 1
    assert rows["dead port"]["status"] == "inactive"
    assert rows["dead port"]["served"] == "0" and int(rows["dead port"]["failures"]) >= 1
    for role in ("plain", "plain 2", "credentials"):
        assert rows[role]["status"] == "active"
        assert int(rows[role]["served"]) > 0
        assert rows[role]["median"] != "-"
    # Everything the three doors fetched (3 x pages, plus the index) went through the
    # three good proxies; the banned one served only its 403s.
    good = sum(int(rows[r]["served"]) for r in ("plain", "plain 2", "credentials"))
    assert good >= 3 * pages + 1
    return rows


def test_demo_in_memory() -> None:
    _assert_demo_ok(_demo("--pages", "12"), pages=12)


def test_demo_on_sqlite_leaves_no_lease_in_the_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    _assert_demo_ok(_demo("--storage", url, "--pages", "10"), pages=10)
    storage = storage_from_url(url)
    try:
        pool = next(p for p in storage.list_pools() if p.name == "pharox-demo")
        proxies = list(storage.list_proxies(str(pool.id)))
        assert len(proxies) == 5
        assert all(p.current_leases == 0 for p in proxies)
        assert sorted(str(p.status.value) for p in proxies) == ["active", "active", "active", "banned", "inactive"]
    finally:
        storage.close()  # type: ignore[attr-defined]
    # A second run on the same file starts from a clean demo pool (new ports).
    _assert_demo_ok(_demo("--storage", url, "--pages", "6"), pages=6)


@pytest.mark.postgres
def test_demo_on_postgresql(tmp_path: Path) -> None:
    with private_database("postgres", tmp_path) as url:
        _assert_demo_ok(_demo("--storage", url, "--pages", "8"), pages=8)


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
    report = {
        "held": 1,
        "released_at_close": 1,
        "proxies": [{"url": "http://127.0.0.1:1", "current_leases": 2}],
        "scrapy": {"items": expected},
        "requests": {"ids": expected, "errors": []},
        "urllib3": {"ids": expected[:2], "errors": ["page 3: ProxyError"]},
    }
    outcome = check(report, pages=3, site_auth_seen=1)
    assert not outcome.ok
    text = "\n".join(outcome.problems)
    assert "1 lease(s) still held" in text
    assert "still counts 2 lease(s)" in text
    assert "urllib3 fetched 2 of 3" in text
    assert "Proxy-Authorization 1 time(s)" in text
    clean = {**report, "held": 0, "released_at_close": 0, "proxies": [], "urllib3": {"ids": expected}}
    assert check(clean, pages=3, site_auth_seen=0).ok


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
