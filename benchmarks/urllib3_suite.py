"""urllib3's own proxy tests, run against `PharoxProxyManager` as a drop-in.

    python benchmarks/urllib3_suite.py            # stock urllib3, then the swapped run; prints a table
    python benchmarks/urllib3_suite.py --keep DIR # keep the work directory (sdist, venv) for a rerun

urllib3's sdist carries `test/with_dummyserver/test_proxy_poolmanager.py`, which runs
real HTTP and HTTPS proxies (hypercorn) against real origins.  This script downloads
the sdist of the installed urllib3 version, builds a throw-away venv with its test
needs and this project, and runs the file twice: as shipped, and with
`ProxyManager` / `proxy_from_url` replaced by a `PharoxProxyManager` whose broker holds
the one proxy URL the test names.  A test that passes on stock urllib3 and fails on
ours is a place where the drop-in is not drop-in; the table lists them.

Tests that call low-level `connection_from_*` outside a request cannot pass as is:
with a pool of proxies there is no proxy until a request leases one (the error says to
use `manager.leased()`).  Network access: PyPI only (pip), traffic on loopback only.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TEST_FILE = "test/with_dummyserver/test_proxy_poolmanager.py"
IMPORT_LINE = "from urllib3.poolmanager import ProxyManager, proxy_from_url"
# The versions urllib3's own lock file names.  Its CONNECT tests need urllib3's patched
# Hypercorn (a git dependency, not on PyPI): without it they fail on stock urllib3 too,
# and the table compares only what passes there.
TEST_NEEDS = [
    "pytest",
    "pytest-timeout",
    "pytest-socket",
    "trustme",
    "hypercorn==0.15.0",
    "quart==0.20.0",
    "quart-trio==0.12.0",
    "trio==0.33.0",
    "cryptography==49.0.0",
    "h2==4.3.0",
]

SWAP = '''"""ProxyManager / proxy_from_url as PharoxProxyManager over a one-proxy broker."""
from pharox_integrations import LeaseBroker
from pharox_integrations.urllib3 import PharoxProxyManager


class ProxyManager(PharoxProxyManager):
    def __init__(self, proxy_url, num_pools=10, headers=None, proxy_headers=None, proxy_ssl_context=None,
                 use_forwarding_for_https=False, proxy_assert_hostname=None, proxy_assert_fingerprint=None, **kw):
        broker = LeaseBroker.from_proxies([str(proxy_url)], acquire_timeout=5)
        super().__init__(broker, num_pools, headers, proxy_headers, proxy_ssl_context, use_forwarding_for_https,
                         proxy_assert_hostname, proxy_assert_fingerprint, **kw)


def proxy_from_url(url, **kw):
    return ProxyManager(proxy_url=url, **kw)
'''


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def outcomes(report: str) -> dict[str, str]:
    """test id -> PASSED / FAILED / ERROR / SKIPPED / XFAIL..., from `pytest -rA` output."""
    found: dict[str, str] = {}
    for line in report.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if m:
            found[m.group(2).split(" - ")[0]] = m.group(1)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work directory to keep (reused when it exists)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="urllib3-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    import urllib3

    version = urllib3.__version__
    venv = work / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"building a venv in {venv} (urllib3 {version}, its test needs, this project)", flush=True)
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(py), "-m", "pip", "install", "-q", f"urllib3=={version}", *TEST_NEEDS, f"{HERE}[urllib3]"],
            [str(py), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"urllib3=={version}",
             "-d", str(work)],
        ):
            done = run(cmd)
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                return 1
    else:  # a kept venv: this project as it is now, not as it was when the venv was built
        done = run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(HERE)])
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
            return 1
    source = work / f"urllib3-{version}"
    if not source.exists():
        with tarfile.open(work / f"urllib3-{version}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    test = source / TEST_FILE
    stock_text = test.read_text()
    if IMPORT_LINE not in stock_text:
        print(f"{TEST_FILE} no longer has {IMPORT_LINE!r}: update this script", file=sys.stderr)
        return 1
    (source / "_pharox_swap.py").write_text(SWAP)
    swapped = test.with_name("test_proxy_poolmanager_pharox.py")
    swapped.write_text(stock_text.replace(IMPORT_LINE, "from _pharox_swap import ProxyManager, proxy_from_url"))

    results = {}
    skipped = {}
    for name, path in (("stock urllib3", test), ("PharoxProxyManager", swapped)):
        done = run([str(py), "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(path.relative_to(source))],
                   cwd=source)
        results[name] = {k.split("::", 1)[1]: v for k, v in outcomes(done.stdout).items() if "::" in k}
        # `-rA` reports skips as "SKIPPED [n] file:line: reason", without test ids.
        skipped[name] = sum(int(n) for n in re.findall(r"^SKIPPED \[(\d+)\]", done.stdout, flags=re.M))
    stock, ours = results["stock urllib3"], results["PharoxProxyManager"]
    passing = {t for t, v in stock.items() if v == "PASSED"}
    kept = {t for t in passing if ours.get(t) == "PASSED"}
    print(f"\nurllib3 {version}: {TEST_FILE}")
    print(f"{'run':<22}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}")
    for name, got in results.items():
        counts = [sum(1 for v in got.values() if v == k) for k in ("PASSED", "FAILED", "ERROR")] + [skipped[name]]
        print(f"{name:<22}{counts[0]:>8}{counts[1]:>8}{counts[2]:>8}{counts[3]:>9}")
    print(f"\n{len(kept)} of the {len(passing)} tests that pass on stock urllib3 pass with PharoxProxyManager")
    for t in sorted(passing - kept):
        print(f"  {ours.get(t, 'MISSING'):<8} {t}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
