"""The `pharox-integrations` command line: the demo, pool tools and the SQL schema.

Exit codes (scripts may rely on them):

* 0 — done, nothing to report;
* 1 — done, with problems: lines skipped by `pool import`, proxies that failed
  `pool check`, a leak or a failed step in `demo`;
* 2 — nothing done: bad arguments, bad storage URL, unknown pool, missing extra;
* 3 — nothing done: the storage cannot be reached or has no schema (`db init`);
* 130 — interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .errors import ConfigurationError, PharoxIntegrationError, StorageUnavailable

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_INTERRUPTED = 130

_EXIT_HELP = (
    "exit codes: 0 done; 1 done with problems (bad import lines, failed checks, demo leak); "
    "2 bad arguments, storage URL or pool name; 3 storage unreachable or without schema; 130 interrupted"
)
_STORAGE_HELP = (
    "storage URL (default: $PHAROX_STORAGE_URL): sqlite:///file.db, postgresql+psycopg://…, mysql+pymysql://…"
)
_IMPORT_CHUNK = 1000
_CSV_URL_COLUMNS = ("url", "proxy")
_CSV_TEXT_COLUMNS = ("country", "city", "source", "isp")
_CSV_INT_COLUMNS = ("asn", "max_concurrency")


class CommandError(Exception):
    """A failure the command reports as one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pharox-integrations",
        description="Lease a proxy per request from a managed pharox pool (Scrapy, requests, urllib3, httpx).",
        epilog=_EXIT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")

    demo = verbs.add_parser(
        "demo",
        help="crawl a local site through real local proxies with every door and print a per-proxy table",
        epilog=_EXIT_HELP,
    )
    demo.add_argument(
        "--storage", default="memory://", metavar="URL", help="storage of the demo pool (default memory://)"
    )
    demo.add_argument("--pool", default="pharox-demo", help="pool the demo (re)creates (default pharox-demo)")
    demo.add_argument("--pages", type=_positive_int, default=24, help="products on the demo site (default 24)")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="only start the demo site and proxies and keep them running (for example_project); Ctrl-C stops",
    )
    demo.add_argument("--site-port", type=int, default=0, help="with --serve: port of the demo site (default: any)")
    demo.add_argument(
        "--proxies-file",
        type=Path,
        default=None,
        help="with --serve: write the proxy list there (for PHAROX_PROXIES_FILE)",
    )

    db = verbs.add_parser("db", help="database schema for the SQL storages", epilog=_EXIT_HELP)
    db_verbs = db.add_subparsers(dest="db_verb", metavar="ACTION", required=True)
    init = db_verbs.add_parser("init", help="create or upgrade the schema")
    init.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)

    pool = verbs.add_parser("pool", help="import, list, inspect and health-check pools", epilog=_EXIT_HELP)
    pool_verbs = pool.add_subparsers(dest="pool_verb", metavar="ACTION", required=True)

    imp = pool_verbs.add_parser("import", help="add the proxies of a file (plain list or CSV) to a pool")
    imp.add_argument(
        "file", help="one proxy URL per line, or CSV with a url column and country/source/... ('-' = stdin)"
    )
    imp.add_argument("--pool", required=True, help="pool to add to (created if missing)")
    imp.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)
    imp.add_argument("--format", choices=("auto", "list", "csv"), default="auto", help="default: guess from the file")
    imp.add_argument("--max-concurrency", type=_positive_int, default=None, help="leases per proxy (default unlimited)")

    lst = pool_verbs.add_parser("list", help="the pools, or with --pool the proxies of one pool")
    lst.add_argument("--pool", default=None)
    lst.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)

    stats = pool_verbs.add_parser("stats", help="status, leases and recent health of every proxy of a pool")
    stats.add_argument("--pool", required=True)
    stats.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)

    chk = pool_verbs.add_parser("check", help="health-check every proxy of a pool (pharox HealthChecker) and save it")
    chk.add_argument("--pool", required=True)
    chk.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)
    chk.add_argument(
        "--target", required=True, metavar="URL", help="page every proxy must fetch, e.g. https://httpbin.org/ip"
    )
    chk.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    chk.add_argument("--concurrency", type=_positive_int, default=20, help="checks at once (default 20)")
    chk.add_argument("--slow-ms", type=_positive_int, default=2000, help="latency above which a proxy is SLOW")
    chk.add_argument("--expect", default="200", help="accepted status codes, comma-separated (default 200)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer > 0")
    return value


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore = _terminate_as_interrupt()
    try:
        return _dispatch(parser, args)
    finally:
        restore()


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.verb == "demo":
            return _demo(args)
        if args.verb == "db" and args.db_verb == "init":
            return _db_init(args)
        if args.verb == "pool":
            handler: Callable[[argparse.Namespace], int] = {
                "import": _pool_import,
                "list": _pool_list,
                "stats": _pool_stats,
                "check": _pool_check,
            }[args.pool_verb]
            return handler(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except CommandError as exc:
        _err(str(exc))
        return exc.code
    except StorageUnavailable as exc:
        _err(str(exc))
        return EXIT_STORAGE
    except PharoxIntegrationError as exc:  # configuration, unknown pool, bad URL: nothing done
        _err(str(exc))
        return EXIT_USAGE
    parser.print_help()
    return EXIT_OK


def _terminate_as_interrupt() -> Callable[[], None]:
    """SIGTERM unwinds like Ctrl-C, so the demo's proxies and worker are stopped too.

    Returns what puts the previous handler back (`main` may run inside a host process).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _err(message: str) -> None:
    print(f"pharox-integrations: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- demo and db


def _demo(args: argparse.Namespace) -> int:
    missing = [m for m in ("scrapy", "requests", "urllib3", "proxy") if not _importable(m)]
    if missing:
        raise CommandError(f"the demo needs {', '.join(missing)}: pip install 'pharox-integrations[demo]'", EXIT_USAGE)
    from .demo.runner import run_demo, serve
    from .storage import storage_from_url

    if args.serve:
        return serve(pages=args.pages, site_port=args.site_port, proxies_file=args.proxies_file)

    if not args.storage.startswith(("memory:", "pharox-memory:")):
        _close(storage_from_url(args.storage))  # a bad URL fails here, before any proxy starts
    return run_demo(args.storage, pages=args.pages, pool=args.pool)


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _db_init(args: argparse.Namespace) -> int:
    from .storage import safe_storage_url

    url = _storage_url(args)
    try:
        from .storage.sql import init_schema
    except ImportError as exc:
        raise CommandError(f"db init needs SQLAlchemy: pip install 'pharox-integrations[sql]' ({exc})") from None
    try:
        init_schema(url)
    except Exception as exc:
        raise _storage_error(url, exc) from None
    print(f"schema ready in {safe_storage_url(url)}")
    return EXIT_OK


# ---------------------------------------------------------------------------- storage plumbing


def _storage_url(args: argparse.Namespace) -> str:
    url: str | None = args.storage or os.environ.get("PHAROX_STORAGE_URL")
    if not url:
        raise CommandError("no storage: pass --storage URL or set PHAROX_STORAGE_URL")
    if url.startswith(("memory:", "pharox-memory:")):
        raise CommandError(
            f"{url} lives inside one process, so there is nothing to import into or read from here; "
            "use a shared storage: sqlite:///file.db, postgresql+psycopg://…, mysql+pymysql://…"
        )
    return url


def _storage_error(url: str, exc: BaseException) -> BaseException:
    """Map a database failure to one clear line and exit code 3 (never a traceback)."""
    from .storage import safe_storage_url

    if isinstance(exc, PharoxIntegrationError) and not isinstance(exc, StorageUnavailable):
        return exc
    text = str(exc).lower()
    if any(s in text for s in ("no such table", "does not exist", "doesn't exist", "undefinedtable")):
        return CommandError(
            f"{safe_storage_url(url)} has no pharox schema: run pharox-integrations db init --storage URL",
            EXIT_STORAGE,
        )
    if isinstance(exc, StorageUnavailable):
        return exc
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    from .exchange import mask_credentials

    return CommandError(
        f"storage {safe_storage_url(url)} unavailable ({type(exc).__name__}: {mask_credentials(first)})", EXIT_STORAGE
    )


@dataclass
class _Opened:
    broker: Any  # LeaseBroker (imported lazily: the CLI starts fast)
    url: str

    def close(self) -> None:
        _close(self.broker.storage)


def _close(storage: object) -> None:
    close = getattr(storage, "close", None)
    if callable(close):
        close()


def _open(args: argparse.Namespace, pool: str | None = None) -> _Opened:
    """The storage behind `--storage`, probed once so failures surface here."""
    from pharox import ProxyManager

    from .broker import LeaseBroker
    from .storage import storage_from_url

    url = _storage_url(args)
    storage = storage_from_url(url)
    try:
        storage.list_pools()
    except Exception as exc:
        _close(storage)
        raise _storage_error(url, exc) from None
    return _Opened(LeaseBroker(ProxyManager(storage), pool=pool or "default"), url)


def _guard_db(opened: _Opened, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except (PharoxIntegrationError, CommandError):
        raise
    except Exception as exc:
        if type(exc).__module__.startswith(("sqlalchemy", "psycopg", "pymysql", "sqlite3")):
            raise _storage_error(opened.url, exc) from None
        raise
    finally:
        opened.close()


# ---------------------------------------------------------------------------- pool import


@dataclass
class _Entry:
    line: int
    spec: Any  # ProxySpec
    fields: dict[str, Any] = field(default_factory=dict)


def _read_entries(text: str, name: str, fmt: str) -> tuple[list[_Entry], list[tuple[int, str]], int]:
    """Parse a list or CSV; returns entries, bad lines (number, reason) and duplicates."""
    from .settings import parse_proxy

    lines = text.splitlines()
    if fmt == "auto":
        first = next((ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
        cells = [c.strip().lower() for c in first.split(",")]
        fmt = "csv" if name.lower().endswith(".csv") or any(c in _CSV_URL_COLUMNS for c in cells) else "list"
    entries: list[_Entry] = []
    bad: list[tuple[int, str]] = []
    seen: set[Any] = set()
    dups = 0

    def add(number: int, url: str, fields: dict[str, Any]) -> None:
        nonlocal dups
        try:
            spec = parse_proxy(url, where=f"line {number}")
        except ConfigurationError as exc:
            bad.append((number, str(exc).removeprefix(f"line {number}: ")))
            return
        if spec.identity in seen:
            dups += 1
            return
        seen.add(spec.identity)
        entries.append(_Entry(number, spec, fields))

    if fmt == "list":
        for number, raw in enumerate(lines, start=1):
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                add(number, line, {})
        return entries, bad, dups

    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for row in reader:
        number = reader.line_num
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            if not any(c in _CSV_URL_COLUMNS for c in header):
                raise CommandError(f"{name}: the CSV header (line {number}) has no 'url' or 'proxy' column")
            continue
        record = {header[i]: v.strip() for i, v in enumerate(row) if i < len(header)}
        url = next((record[c] for c in _CSV_URL_COLUMNS if record.get(c)), "")
        if not url:
            bad.append((number, "no proxy URL in this row"))
            continue
        fields: dict[str, Any] = {c: record[c] for c in _CSV_TEXT_COLUMNS if record.get(c)}
        if "country" in fields:
            fields["country"] = fields["country"].upper()
        try:
            for c in _CSV_INT_COLUMNS:
                if record.get(c):
                    fields[c] = int(record[c])
                    if fields[c] <= 0:
                        raise ValueError
        except ValueError:
            bad.append((number, f"{c}={record[c]!r} is not a positive integer"))
            continue
        add(number, url, fields)
    return entries, bad, dups


def _pool_import(args: argparse.Namespace) -> int:
    name = "stdin" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CommandError(f"cannot read {name}: {exc.strerror or exc}") from None
    entries, bad, dups = _read_entries(text, name, args.format)
    opened = _open(args, args.pool)

    def run() -> int:
        added = 0
        progress = _Progress(len(entries), "imported", enabled=len(entries) > _IMPORT_CHUNK)
        for start in range(0, len(entries), _IMPORT_CHUNK):
            chunk = entries[start : start + _IMPORT_CHUNK]
            groups: dict[tuple[tuple[str, Any], ...], list[Any]] = {}
            for entry in chunk:
                groups.setdefault(tuple(sorted(entry.fields.items())), []).append(entry.spec)
            for key, specs in groups.items():
                fields = dict(key)
                concurrency = fields.pop("max_concurrency", args.max_concurrency)
                added += len(opened.broker.add_proxies(specs, pool=args.pool, max_concurrency=concurrency, **fields))
            progress.update(start + len(chunk))
        progress.finish()
        already = len(entries) - added
        print(
            f"imported {added} new prox{'y' if added == 1 else 'ies'} into pool {args.pool!r} "
            f"({already} already there, {dups} duplicate line(s), {len(bad)} bad line(s))"
        )
        for number, reason in bad:
            print(f"  {name} line {number}: {reason}", file=sys.stderr)
        return EXIT_PROBLEMS if bad else EXIT_OK

    return _guard_db(opened, run)


class _Progress:
    """A progress line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, verb: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.verb = verb
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.stream.isatty()

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // self.total
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.verb} {done}/{self.total}{extra}"
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- list and stats


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in head], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])])


def _status(proxy: Any) -> str:
    return str(getattr(proxy.status, "value", proxy.status))


def _safe(proxy: Any) -> str:
    from .settings import format_host

    return f"{getattr(proxy.protocol, 'value', proxy.protocol)}://{format_host(str(proxy.host))}:{proxy.port}"


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = max(0.0, (datetime.now(timezone.utc) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _pool_list(args: argparse.Namespace) -> int:
    opened = _open(args, args.pool)

    def run() -> int:
        broker = opened.broker
        if args.pool is None:
            rows = []
            for name in broker.pools():
                proxies = broker.proxies(name)
                counts = {
                    s: sum(1 for p in proxies if _status(p) == s) for s in ("active", "banned", "inactive", "slow")
                }
                leased = sum(1 for p in proxies if p.current_leases)
                rows.append((name, len(proxies), *counts.values(), leased))
            if not rows:
                print("no pools in this storage (add some with: pharox-integrations pool import FILE --pool NAME)")
                return EXIT_OK
            print(table(("pool", "proxies", "active", "banned", "inactive", "slow", "leased"), rows, range(1, 7)))
            return EXIT_OK
        proxies = sorted(broker.proxies(args.pool), key=lambda p: (str(p.host), p.port))
        rows2 = [
            (_safe(p), _status(p), p.country, p.source, p.current_leases, p.max_concurrency, _ago(p.checked_at))
            for p in proxies
        ]
        print(table(("proxy", "status", "country", "source", "leases", "max", "checked"), rows2, (4, 5)))
        print(f"{len(proxies)} prox{'y' if len(proxies) == 1 else 'ies'} in pool {args.pool!r}")
        return EXIT_OK

    return _guard_db(opened, run)


def _pool_stats(args: argparse.Namespace) -> int:
    import statistics

    from .exchange import mask_credentials

    opened = _open(args, args.pool)

    def run() -> int:
        broker = opened.broker
        proxies = broker.proxies(args.pool)
        rows = []
        latencies: list[int] = []
        for p in sorted(proxies, key=lambda p: (str(p.host), p.port)):
            records = list(broker.storage.list_health_records(p.id, limit=20))
            good = [r for r in records if str(getattr(r.status_after, "value", r.status_after)) == "active"]
            lat = [r.latency_ms for r in good if r.latency_ms]
            latencies.extend(lat)
            last = max(records, key=lambda r: r.checked_at) if records else None
            detail = None
            if last is not None:
                after = str(getattr(last.status_after, "value", last.status_after))
                detail = f"{after}: {mask_credentials(last.error)[:50]}" if last.error else after
            ok = len(good)
            rows.append(
                (
                    _safe(p),
                    _status(p),
                    p.current_leases,
                    f"{ok}/{len(records)}",
                    statistics.median(lat) if lat else None,
                    _ago(p.checked_at),
                    detail,
                )
            )
        by = {s: sum(1 for p in proxies if _status(p) == s) for s in ("active", "banned", "inactive", "slow")}
        leased = sum(p.current_leases for p in proxies)
        median = f"{statistics.median(latencies):.0f} ms" if latencies else "-"
        print(
            f"pool {args.pool!r}: {len(proxies)} proxies, {by['active']} active, {by['banned']} banned, "
            f"{by['inactive']} inactive, {by['slow']} slow; {leased} lease(s) in use; median latency {median}"
        )
        if rows:
            print(table(("proxy", "status", "leases", "ok/recent", "median ms", "checked", "last"), rows, (2, 3, 4)))
        return EXIT_OK

    return _guard_db(opened, run)


# ---------------------------------------------------------------------------- pool check


def _pool_check(args: argparse.Namespace) -> int:
    try:
        codes = [int(c) for c in str(args.expect).split(",") if c.strip()]
    except ValueError:
        raise CommandError(f"--expect {args.expect!r}: expected status codes such as 200,204") from None
    opened = _open(args, args.pool)

    def run() -> int:
        from pharox import HealthCheckOptions

        try:
            options = HealthCheckOptions(
                target_url=args.target,
                timeout=args.timeout,
                expected_status_codes=codes,
                slow_threshold_ms=args.slow_ms,
            )
        except ValueError as exc:
            raise CommandError(f"--target/--timeout: {str(exc).splitlines()[0]}") from None
        proxies = opened.broker.proxies(args.pool)
        if not proxies:
            print(f"pool {args.pool!r} has no proxies: nothing to check")
            return EXIT_OK
        results = asyncio.run(_check_all(opened.broker.storage, proxies, options, args.concurrency))
        rows = []
        by_id = {p.id: p for p in proxies}
        failed = 0
        for result in sorted(results, key=lambda r: (str(by_id[r.proxy_id].host), by_id[r.proxy_id].port)):
            status = str(getattr(result.status, "value", result.status))
            failed += status != "active"
            detail = f"HTTP {result.status_code}" if result.status_code else ""
            if result.error_message:
                detail = (detail + " " + result.error_message).strip()
            rows.append((_safe(by_id[result.proxy_id]), status, result.latency_ms, detail[:70]))
        print(table(("proxy", "result", "latency ms", "detail"), rows, (2,)))
        print(
            f"checked {len(results)} prox{'y' if len(results) == 1 else 'ies'}: "
            f"{len(results) - failed} active, {failed} not"
        )
        return EXIT_PROBLEMS if failed else EXIT_OK

    return _guard_db(opened, run)


def _quoted(proxy: Any) -> Any:
    """The proxy with a URL whose credentials survive the trip (see `build_proxy_url`).

    pharox's checker connects to `proxy.url`, which encodes credentials with
    `quote_plus`: a space becomes `+` and the proxy rejects the password.
    """
    return _quoted_proxy_class().model_validate(proxy.model_dump())


@functools.cache
def _quoted_proxy_class() -> Any:
    from pharox import Proxy

    from .settings import build_proxy_url

    class QuotedProxy(Proxy):
        @property
        def url(self) -> str:
            creds = self.credentials
            protocol = str(getattr(self.protocol, "value", self.protocol))
            user, password = (creds.user, creds.password) if creds else (None, None)
            return build_proxy_url(protocol, str(self.host), self.port, user, password)

    return QuotedProxy


async def _check_all(storage: Any, proxies: list[Any], options: Any, concurrency: int) -> list[Any]:
    """pharox's HealthChecker over every proxy, `concurrency` at a time; each result saved."""
    from pharox import HealthChecker

    from .exchange import mask_credentials

    checker = HealthChecker(default_options=options)
    gate = asyncio.Semaphore(concurrency)
    progress = _Progress(len(proxies), "checked")
    results: list[Any] = []

    async def one(proxy: Any) -> Any:
        async with gate:
            result = await checker.check_proxy(_quoted(proxy))
        if result.error_message:
            result = result.model_copy(update={"error_message": mask_credentials(result.error_message)})
        await asyncio.to_thread(storage.apply_health_check_result, result)
        return result

    for task in asyncio.as_completed([one(p) for p in proxies]):
        results.append(await task)
        bad = sum(1 for r in results if str(getattr(r.status, "value", r.status)) != "active")
        progress.update(len(results), f" ({bad} not active)")
    progress.finish()
    return results


if __name__ == "__main__":
    sys.exit(main())
