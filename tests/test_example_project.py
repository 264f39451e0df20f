"""example_project works as documented: `scrapy crawl shop` and the two scripts.

The demo site and proxies run in this process (the same code as `demo --serve`);
the crawl and the scripts run as a user runs them, in their own processes from
inside example_project/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pharox_integrations.demo.proxies import DemoProxies
from pharox_integrations.demo.site import DemoSite, product
from pharox_integrations.sites import site_of
from pharox_integrations.storage import storage_from_url
from pharox_integrations.storage.sql import init_schema

PROJECT = Path(__file__).resolve().parent.parent / "example_project"
PAGES = 12
DEMO_PASSWORD = "s3cret-pass"


@dataclass
class Shop:
    site: DemoSite
    proxies: DemoProxies
    proxies_file: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("PHAROX_")}
        env.pop("SCRAPY_SETTINGS_MODULE", None)
        env["PHAROX_PROXIES_FILE"] = str(self.proxies_file)
        env.update(extra)
        return env

    def served_by_banned(self) -> int:
        return sum(self.site.hits[ip] for ip in self.proxies.banned_ips)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    with DemoProxies() as proxies, DemoSite(pages=PAGES, banned_ips=proxies.banned_ips) as site:
        listing = tmp_path / "proxies.txt"
        listing.write_text("\n".join(p.url for p in proxies.items) + "\n")
        yield Shop(site, proxies, listing)


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=180, check=False)


def _crawl(shop: Shop, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "scrapy", "crawl", "shop", "-a", f"site_url={shop.site.url}", "-O", str(out)]
    return _run([*argv, "-s", "LOG_LEVEL=INFO"], shop.env(**env))


def _stat(log: str, key: str) -> int:
    match = re.search(rf"'{re.escape(key)}': (\d+)", log)
    assert match, f"no {key} in the crawl's stats"
    return int(match.group(1))


def test_scrapy_crawl_inside_example_project(shop: Shop, tmp_path: Path) -> None:
    out = tmp_path / "items.json"
    done = _crawl(shop, out)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    items = json.loads(out.read_text())
    assert sorted(i["name"] for i in items) == sorted(product(i)["name"] for i in range(1, PAGES + 1))
    good = {p.safe_url for p in shop.proxies.items if p.role in ("plain", "credentials")}
    assert {i["proxy"] for i in items} <= good  # served by the good proxies, named without credentials
    assert _stat(log, "pharox/leases/acquired") == _stat(log, "pharox/leases/released")
    assert _stat(log, "pharox/bans") >= 1  # the banned proxy was met and benched
    assert DEMO_PASSWORD not in log and DEMO_PASSWORD not in out.read_text()
    assert shop.site.proxy_auth_seen == 0


@pytest.mark.parametrize("script", ["requests_example.py", "urllib3_example.py"])
def test_client_scripts(shop: Shop, script: str) -> None:
    done = _run([sys.executable, script, shop.site.url, str(PAGES)], shop.env())
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = [ln for ln in done.stdout.splitlines() if re.match(r"\s*\d+\s", ln)]
    assert [int(ln.split()[0]) for ln in lines] == list(range(1, PAGES + 1))
    assert "pool 'default'" in done.stdout and "0 leased" in done.stdout
    assert DEMO_PASSWORD not in output


def test_one_sqlite_pool_shared_by_the_crawl_and_a_script(shop: Shop, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    init_schema(url)
    # A cool-down longer than both runs, however slow the machine, so the ban holds.
    slow = {"PHAROX_STORAGE_URL": url, "PHAROX_BACKOFF_BASE": "600"}
    done = _crawl(shop, tmp_path / "items.json", **slow)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    banned_hits = shop.served_by_banned()
    assert banned_hits >= 1

    done = _run([sys.executable, "requests_example.py", shop.site.url, str(PAGES)], shop.env(**slow))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # The script found the proxy already banned by the crawl and never used it.
    assert shop.served_by_banned() == banned_hits

    storage = storage_from_url(url)
    try:
        pool = next(p for p in storage.list_pools() if p.name == "default")
        proxies = {p.port: p for p in storage.list_proxies(str(pool.id))}
        site = site_of(shop.site.url)
        assert site is not None
        held = {pid for pid, s, hold in storage.site_store().in_force(time.time(), site) if hold.kind == "ban"}  # type: ignore[attr-defined]
    finally:
        storage.close()  # type: ignore[attr-defined]
    assert len(proxies) == 5  # both processes seeded the same file: no duplicates
    assert all(p.current_leases == 0 for p in proxies.values())
    banned_port = next(p.port for p in shop.proxies.items if p.role.startswith("banned"))
    # The shop's ban is the shop's: the proxy stays active, held off this site only.
    assert str(proxies[banned_port].status.value) == "active"
    assert held == {proxies[banned_port].id}


def test_settings_module_is_a_valid_pharox_configuration(tmp_path: Path) -> None:
    # Loaded the way the scripts load it, and parsed by the real schema (unknown or bad keys fail).
    listing = tmp_path / "proxies.txt"
    listing.write_text("http://127.0.0.1:3128\n")
    code = (
        "from pharox_config import pharox_settings; from pharox_integrations import PharoxSettings; "
        "s = PharoxSettings.from_mapping(pharox_settings()); "
        "print(s.max_failures, s.max_moves, s.storage_url, len(s.proxies))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHAROX_")}
    done = _run([sys.executable, "-c", code], {**env, "PHAROX_PROXIES_FILE": str(listing)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "5", "memory://", "1"]


def test_crawl_without_a_proxy_list_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHAROX_")}
    env["PHAROX_PROXIES_FILE"] = str(tmp_path / "missing.txt")
    done = _run([sys.executable, "-m", "scrapy", "crawl", "shop"], env)
    assert done.returncode != 0
    assert "PHAROX_PROXIES_FILE" in done.stderr and "cannot read it" in done.stderr
