"""The command line against real SQLite files, real proxies and a real target.

Every exit code the docs promise is checked: 0 done, 1 done with problems, 2 nothing
done (arguments, URL, pool), 3 storage unreachable or without schema.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import SPECIAL_AUTH, ProxyKit, TargetServer

from pharox_integrations import __version__
from pharox_integrations.cli import EXIT_OK, EXIT_PROBLEMS, EXIT_STORAGE, EXIT_USAGE, main
from pharox_integrations.storage import storage_from_url
from pharox_integrations.storage.sql import init_schema

SECRET = "hunter2-secret"


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    init_schema(url)
    return url


def _proxies(url: str, pool: str) -> list[object]:
    storage = storage_from_url(url)
    try:
        record = next(p for p in storage.list_pools() if p.name == pool)
        return list(storage.list_proxies(str(record.id)))
    finally:
        storage.close()  # type: ignore[attr-defined]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_from_the_installed_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pharox_integrations.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert __version__ in done.stdout


def test_db_init_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    for _ in range(2):
        code, out, _err = run(capsys, "db", "init", "--storage", url)
        assert code == EXIT_OK
        assert "schema ready" in out
    assert run(capsys, "pool", "list", "--storage", url)[0] == EXIT_OK


def test_import_list_reports_bad_lines_and_imports_the_rest(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "proxies.txt"
    listing.write_text(
        "# my proxies\n"
        "http://127.0.0.1:3128\n"
        f"socks5://user:{SECRET}@127.0.0.1:1080   # the SOCKS one\n"
        f"bogus://user:{SECRET}@127.0.0.1:1\n"
        f"http://user:{SECRET}@127.0.0.1:99999\n"
        "127.0.0.1:3128\n"
        "\n"
        "[::1]:8080\n"
    )
    code, out, err = run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", "shop")
    assert code == EXIT_PROBLEMS
    assert "imported 3 new proxies into pool 'shop'" in out
    assert "1 duplicate line(s), 2 bad line(s)" in out
    assert "proxies.txt line 4: unsupported proxy protocol 'bogus'" in err
    assert "proxies.txt line 5:" in err and "99999" in err
    assert SECRET not in out + err
    assert len(_proxies(db, "shop")) == 3

    # Idempotent: the same file again adds nothing (and still reports the bad lines).
    code, out, _err = run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", "shop")
    assert code == EXIT_PROBLEMS
    assert "imported 0 new proxies" in out and "3 already there" in out
    assert len(_proxies(db, "shop")) == 3


def test_import_csv_keeps_country_and_source(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sheet = tmp_path / "providers.csv"
    sheet.write_text(
        "url,country,source,max_concurrency\n"
        f"http://user:{SECRET}@127.0.0.1:4000,us,provider-a,2\n"
        "http://127.0.0.1:4001,DE,provider-b,\n"
        "not a proxy,fr,x,\n"
        "http://127.0.0.1:4002,fr,provider-c,zero\n"
    )
    code, out, err = run(capsys, "pool", "import", str(sheet), "--storage", db, "--pool", "geo")
    assert code == EXIT_PROBLEMS
    assert "imported 2 new proxies" in out
    assert "providers.csv line 4:" in err and "providers.csv line 5: max_concurrency='zero'" in err
    by_port = {p.port: p for p in _proxies(db, "geo")}  # type: ignore[attr-defined]
    assert (by_port[4000].country, by_port[4000].source, by_port[4000].max_concurrency) == ("US", "provider-a", 2)
    assert (by_port[4001].country, by_port[4001].max_concurrency) == ("DE", None)

    code, out, err = run(capsys, "pool", "list", "--storage", db, "--pool", "geo")
    assert code == EXIT_OK
    assert "http://127.0.0.1:4000" in out and "provider-a" in out and "US" in out
    assert SECRET not in out + err


def test_import_big_file_shows_progress(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.txt"
    big.write_text("".join(f"http://127.0.{i // 250}.{i % 250 + 1}:8080\n" for i in range(2500)))
    code, out, err = run(capsys, "pool", "import", str(big), "--storage", db, "--pool", "big")
    assert code == EXIT_OK
    assert "imported 2500 new proxies" in out
    assert "imported 1000/2500" in err and "imported 2500/2500" in err  # one line per chunk off a terminal
    assert len(_proxies(db, "big")) == 2500


def test_list_and_stats_tables(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "p.txt"
    listing.write_text(f"http://user:{SECRET}@127.0.0.1:5000\nhttp://127.0.0.1:5001\n")
    assert run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", "a")[0] == EXIT_OK
    code, out, _ = run(capsys, "pool", "list", "--storage", db)
    assert code == EXIT_OK
    header, _rule, row = out.splitlines()[:3]
    assert header.split() == ["pool", "proxies", "active", "banned", "inactive", "slow", "leased"]
    assert row.split() == ["a", "2", "2", "0", "0", "0", "0"]
    code, out, err = run(capsys, "pool", "stats", "--storage", db, "--pool", "a")
    assert code == EXIT_OK
    assert "pool 'a': 2 proxies, 2 active" in out
    assert SECRET not in out + err


def test_unknown_pool_names_the_known_ones(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "p.txt"
    listing.write_text("http://127.0.0.1:5000\n")
    run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", "shop")
    for verb in ("list", "stats"):
        code, _out, err = run(capsys, "pool", verb, "--storage", db, "--pool", "shpo")
        assert code == EXIT_USAGE
        assert "pool 'shpo' does not exist (pools in this storage: 'shop')" in err


def test_storage_errors_have_their_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    code, _, err = run(capsys, "pool", "list", "--storage", empty)
    assert code == EXIT_STORAGE and "db init" in err

    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        url = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{port}/test"
        code, _, err = run(capsys, "pool", "list", "--storage", url)
        assert code == EXIT_STORAGE
        assert "unavailable" in err and SECRET not in err
        code, _, err = run(capsys, "db", "init", "--storage", url)
        assert code == EXIT_STORAGE
        assert "unavailable" in err and SECRET not in err

    assert run(capsys, "pool", "list", "--storage", "memory://")[0] == EXIT_USAGE
    code, _, err = run(capsys, "pool", "list", "--storage", "nosuch://x")
    assert code == EXIT_USAGE and "unknown storage URL" in err
    code, _, err = run(capsys, "pool", "import", str(tmp_path / "missing.txt"), "--storage", empty, "--pool", "x")
    assert code == EXIT_USAGE and "cannot read" in err


def test_storage_url_from_the_environment(
    db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PHAROX_STORAGE_URL", raising=False)
    code, _, err = run(capsys, "pool", "list")
    assert code == EXIT_USAGE and "PHAROX_STORAGE_URL" in err
    monkeypatch.setenv("PHAROX_STORAGE_URL", db)
    assert run(capsys, "pool", "list")[0] == EXIT_OK


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["pool", "stats"])  # --pool is required
    assert exc.value.code == EXIT_USAGE


@pytest.fixture
def check_kit(tmp_path: Path) -> Iterator[ProxyKit]:
    with ProxyKit(tmp_path / "kit") as kit:
        yield kit


def test_pool_check_writes_results(
    db: str, tmp_path: Path, check_kit: ProxyKit, target: TargetServer, capsys: pytest.CaptureFixture[str]
) -> None:
    good, special = check_kit.many("http", [None, SPECIAL_AUTH])
    dead = check_kit.dead()
    listing = tmp_path / "p.txt"
    listing.write_text(f"{good.url}\n{special.url}\n{dead.url}\n")
    assert run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", "chk")[0] == EXIT_OK

    code, out, err = run(
        capsys,
        "pool",
        "check",
        "--storage",
        db,
        "--pool",
        "chk",
        "--target",
        f"{target.url}/status/200",
        "--timeout",
        "5",
    )
    assert code == EXIT_PROBLEMS, out + err  # the dead port is not active
    assert "checked 3 proxies: 2 active, 1 not" in out
    assert "checked 3/3" in err  # progress
    statuses = {p.port: str(p.status.value) for p in _proxies(db, "chk")}  # type: ignore[attr-defined]
    # Credentials with ':', '@', '/', '%', '+' and a space get through (pharox's own URL would not).
    assert statuses == {good.port: "active", special.port: "active", dead.port: "inactive"}
    assert not target.saw_header("Proxy-Authorization")
    for part in SPECIAL_AUTH:
        assert part not in out + err

    code, out, _ = run(capsys, "pool", "stats", "--storage", db, "--pool", "chk")
    assert code == EXIT_OK and "2 active, 0 banned, 1 inactive" in out


def test_main_puts_the_sigterm_handler_back(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert run(capsys, "pool", "list", "--storage", db)[0] == EXIT_OK
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------- long listings


def _import_many(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], pool: str, count: int) -> None:
    listing = tmp_path / f"{pool}.txt"
    listing.write_text("".join(f"http://user:{SECRET}@127.0.{i // 250}.{i % 250 + 1}:8080\n" for i in range(count)))
    assert run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", pool)[0] == EXIT_OK


def _ban(db: str, pool: str, hosts: set[str]) -> None:
    from pharox import ProxyStatus

    storage = storage_from_url(db)
    try:
        for p in _proxies(db, pool):
            if str(p.host) in hosts:  # type: ignore[attr-defined]
                storage.save_proxy(p.model_copy(update={"status": ProxyStatus.BANNED}))  # type: ignore[attr-defined]
    finally:
        storage.close()  # type: ignore[attr-defined]


def _rows(out: str) -> list[str]:
    """The body of the first table in `out` (between its rule and the first non-row line)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    return [line for line in lines[rule + 1 :] if line.startswith(("http", "socks"))]


def test_long_listings_show_50_rows_and_say_how_many_more(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _import_many(db, tmp_path, capsys, "big", 120)
    _ban(db, "big", {"127.0.0.99", "127.0.0.100"})  # by address, rows 99 and 100 of 120

    code, out, err = run(capsys, "pool", "list", "--storage", db, "--pool", "big")
    assert code == EXIT_OK and err == ""
    rows = _rows(out)
    assert len(rows) == 50
    assert [r.split()[0] for r in rows[:3]] == [f"http://127.0.0.{i}:8080" for i in (1, 2, 3)]
    assert "… and 70 more (use --limit 0 for all)" in out
    assert "120 proxies in pool 'big'" in out

    code, out, _ = run(capsys, "pool", "list", "--storage", db, "--pool", "big", "--limit", "0")
    assert len(_rows(out)) == 120 and "more (use --limit 0" not in out

    code, out, _ = run(capsys, "pool", "stats", "--storage", db, "--pool", "big", "--limit", "5")
    assert code == EXIT_OK
    rows = _rows(out)
    assert len(rows) == 5
    assert [r.split()[1] for r in rows[:2]] == ["banned", "banned"]  # trouble first
    assert "… and 115 more (use --limit 0 for all)" in out
    assert out.startswith("pool 'big': 120 proxies, 118 active, 2 banned")  # the counts cover every proxy

    _import_many(db, tmp_path, capsys, "other", 1)
    code, out, _ = run(capsys, "pool", "list", "--storage", db, "--limit", "1")
    assert out.splitlines()[2].split()[:2] == ["big", "120"]
    assert "… and 1 more (use --limit 0 for all)" in out
    assert SECRET not in out


def test_long_cells_are_cut_with_an_ellipsis(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = "provider-" + "x" * 90
    sheet = tmp_path / "p.csv"
    sheet.write_text(f"url,source\nhttp://127.0.0.1:5000,{source}\n")
    assert run(capsys, "pool", "import", str(sheet), "--storage", db, "--pool", "a")[0] == EXIT_OK
    code, out, _ = run(capsys, "pool", "list", "--storage", db, "--pool", "a")
    assert code == EXIT_OK
    assert source[:59] + "…" in out and source not in out


def test_stats_of_every_proxy_in_a_big_pool_shows_compact_progress(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _import_many(db, tmp_path, capsys, "big", 600)
    code, out, err = run(capsys, "pool", "stats", "--storage", db, "--pool", "big")
    assert code == EXIT_OK and err == ""  # 50 rows: nothing to wait for
    code, out, err = run(capsys, "pool", "stats", "--storage", db, "--pool", "big", "--limit", "0")
    assert code == EXIT_OK
    assert len(_rows(out)) == 600
    lines = err.splitlines()
    assert lines[-1].endswith("read health of 600/600")
    assert len(lines) <= 11  # off a terminal: a line per tenth, not per proxy


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line_at_most_ten_times_a_second() -> None:
    from pharox_integrations.cli import _Progress

    stream = _Terminal()
    progress = _Progress(10_000, "checked", stream=stream)
    for done in range(1, 10_001):
        progress.update(done)
    progress.finish()
    text = stream.getvalue()
    assert text.startswith("\r[") and text.endswith("checked 10000/10000\n")
    assert text.count("\r") < 50  # throttled, and the final state always shown


# ---------------------------------------------------------------------------- per-site standing


class _Answer:
    """What a client hands `report(response=...)`: only its headers are read."""

    def __init__(self, **headers: str) -> None:
        self.headers = headers


def _site_rows(out: str) -> dict[str, dict[str, str]]:
    """`pool stats --site` rows by proxy URL: {column: cell} (cells are two or more spaces apart)."""
    head = ["proxy", "status", "leases", "ok/recent", "median ms", "checked", "at site", "left s", "strikes", "last"]
    rows: dict[str, dict[str, str]] = {}
    for line in _rows(out):
        cells = dict(zip(head, re.split(r"\s{2,}", line), strict=True))
        rows[cells["proxy"]] = cells
    return rows


def test_stats_for_a_site_shows_each_proxys_standing_there(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pharox import ProxyManager

    from pharox_integrations.broker import LeaseBroker

    listing = tmp_path / "p.txt"
    listing.write_text(
        f"http://user:{SECRET}@10.9.0.1:8080\n" + "".join(f"http://10.9.0.{i}:8080\n" for i in (2, 3, 4, 5, 6))
    )
    assert run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", "shop")[0] == EXIT_OK

    # Real verdicts through a real broker on the file (nothing is sent: the addresses are never dialled).
    storage = storage_from_url(db)
    try:
        broker = LeaseBroker(ProxyManager(storage), pool="shop")
        lease = broker.acquire("https://www.shop.example/cart")
        banned = lease.safe_url
        broker.finish(lease, 403)  # banned by shop.example only
        lease = broker.acquire("https://shop.example/search")
        cooling = lease.safe_url
        broker.finish(lease, 429, response=_Answer(**{"Retry-After": "120"}))  # asked to pause 120 s, no strike
        lease = broker.acquire("https://other.example/")
        elsewhere = lease.safe_url
        broker.finish(lease, 403)  # another site's verdict: nothing to shop.example
        lease = broker.acquire()
        benched = lease.safe_url
        broker.finish(lease, 403)  # no site known: benched everywhere, as before sites
        polite = LeaseBroker(ProxyManager(storage), pool="shop", site_delay=60)
        lease = polite.acquire("https://shop.example/")
        delayed = lease.safe_url
        polite.finish(lease, 200)  # its next visit to shop.example is 60 s away
        health = polite.health(site="shop.example")  # `broker` may see the delay up to 1 s later
        assert len({banned, cooling, elsewhere, benched, delayed}) == 5  # the broker spread them
    finally:
        storage.close()  # type: ignore[attr-defined]
    assert (health.site_usable, health.site_banned, health.site_cooling) == (2, 1, 2)

    # The site named by a URL with credentials: the same site, and the secret never shown.
    code, out, err = run(
        capsys, "pool", "stats", "--storage", db, "--pool", "shop", "--site", f"https://u:{SECRET}@WWW.Shop.Example/x"
    )
    assert code == EXIT_OK, err
    assert SECRET not in out + err
    lines = out.splitlines()
    assert lines[0].startswith("pool 'shop': 6 proxies, 5 active, 1 banned, 0 inactive, 0 slow")
    summary = re.fullmatch(
        r"site 'shop\.example': 2 of 5 active proxies usable; "
        r"1 banned there, next in ([\d.]+) s; 2 cooling, next in ([\d.]+) s",
        lines[1],
    )
    assert summary, lines[1]
    assert 20 < float(summary.group(1)) <= 30  # a first ban: the backoff base (30 s), jitter never below it
    assert 50 < float(summary.group(2)) <= 60  # the politeness delay ends before the 120 s cool-down
    head = ["proxy", "status", "leases", "ok/recent", "median ms", "checked", "at site", "left s", "strikes", "last"]
    assert re.split(r"\s{2,}", lines[2]) == head

    rows = _site_rows(out)
    # Benched everywhere first, then what the site holds off (ban, cool-down, delay), then the rest.
    assert list(rows)[:4] == [benched, banned, cooling, delayed]
    assert rows[benched]["status"] == "banned" and rows[benched]["last"] == "banned: HTTP 403"
    assert (rows[benched]["at site"], rows[benched]["left s"], rows[benched]["strikes"]) == ("-", "-", "-")
    assert (rows[banned]["at site"], rows[banned]["strikes"]) == ("banned there", "1")
    assert 20 < float(rows[banned]["left s"]) <= 30
    assert (rows[cooling]["at site"], rows[cooling]["strikes"]) == ("cooling", "0")  # a cool-down is no strike
    assert 110 < float(rows[cooling]["left s"]) <= 120  # the time the site asked for
    assert (rows[delayed]["at site"], rows[delayed]["strikes"]) == ("delay", "0")
    assert 50 < float(rows[delayed]["left s"]) <= 60
    assert (rows[elsewhere]["at site"], rows[elsewhere]["left s"]) == ("usable", "-")  # other.example's ban only
    assert all(row["status"] == "active" for proxy, row in rows.items() if proxy != benched)

    # The other site sees its own ban only.
    code, out, _ = run(capsys, "pool", "stats", "--storage", db, "--pool", "shop", "--site", "other.example")
    assert code == EXIT_OK
    assert re.fullmatch(
        r"site 'other\.example': 4 of 5 active proxies usable; 1 banned there, next in [\d.]+ s; 0 cooling",
        out.splitlines()[1],
    )
    assert _site_rows(out)[elsewhere]["at site"] == "banned there"

    # Holds are keyed by registrable domain: with --site-scope host a host is its own site, with none here.
    code, out, _ = run(
        capsys, "pool", "stats", "--storage", db, "--pool", "shop", "--site", "www.shop.example", "--site-scope", "host"
    )
    assert code == EXIT_OK
    assert out.splitlines()[1] == "site 'www.shop.example': 5 of 5 active proxies usable; 0 banned there; 0 cooling"

    # Without --site, the table is what it always was.
    code, out, _ = run(capsys, "pool", "stats", "--storage", db, "--pool", "shop")
    assert "at site" not in out and "site '" not in out


def test_stats_site_errors_are_one_line(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "p.txt"
    listing.write_text("http://10.9.0.1:8080\n")
    assert run(capsys, "pool", "import", str(listing), "--storage", db, "--pool", "shop")[0] == EXIT_OK
    for bad in ("", "https://", f"https://u:{SECRET} x@shop.example/"):
        with pytest.raises(SystemExit) as exc:
            main(["pool", "stats", "--storage", db, "--pool", "shop", "--site", bad])
        assert exc.value.code == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "argument --site:" in err and "expected a site" in err
        assert SECRET not in err
    monkeypatch.setenv("PHAROX_SITE_SCOPE", "street")
    code, out, err = run(capsys, "pool", "stats", "--storage", db, "--pool", "shop", "--site", "shop.example")
    assert code == EXIT_USAGE and out == ""
    assert err == "pharox-integrations: error: PHAROX_SITE_SCOPE='street': expected one of domain, host\n"
    monkeypatch.setenv("PHAROX_SITE_SCOPE", "HOST")
    code, out, _ = run(capsys, "pool", "stats", "--storage", db, "--pool", "shop", "--site", "www.shop.example")
    assert code == EXIT_OK and "site 'www.shop.example': 1 of 1 active proxy usable" in out
    code, _, err = run(capsys, "pool", "stats", "--storage", db, "--pool", "nope", "--site", "shop.example")
    assert code == EXIT_USAGE and "pool 'nope' does not exist" in err
