"""The `pharox-integrations` command line: the demo, pool tools and the SQL schema.

Exit codes (scripts may rely on them):

* 0 — done, nothing to report;
* 1 — done, with problems: lines skipped by `pool import`, proxies that failed
  `pool check`, a leak or a failed step in `demo`;
* 2 — nothing done: bad arguments, bad storage URL, unknown pool, missing extra;
* 3 — nothing done: the storage cannot be used (unreachable, no such database, login
  refused) or has no schema (`db init`);
* 130 — interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import io
import ipaddress
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TextIO

from . import __version__
from .errors import ConfigurationError, PharoxIntegrationError, StorageUnavailable

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_INTERRUPTED = 130

_EXIT_HELP = (
    "exit codes: 0 done; 1 done with problems (bad import lines, failed checks, demo leak); "
    "2 bad arguments, storage URL or pool name; 3 storage unreachable, missing database, login refused or no schema; "
    "130 interrupted"
)
_STORAGE_HELP = (
    "storage URL (default: $PHAROX_STORAGE_URL): sqlite:///file.db, postgresql+psycopg://…, mysql+pymysql://…"
)
_LIMIT_HELP = "rows to show (default 50; 0 shows all)"
_DEFAULT_LIMIT = 50
_IMPORT_CHUNK = 1000
_CSV_URL_COLUMNS = ("url", "proxy")
_CSV_TEXT_COLUMNS = ("country", "city", "source", "isp")
_CSV_INT_COLUMNS = ("asn", "max_concurrency")
_CELL = 60  # widest table cell; longer text is cut with "…"
_CONNECT_TIMEOUT = 10  # seconds; libpq's default waits for the TCP stack (minutes)
_SITE_SCOPES = ("domain", "host")  # as pharox_integrations.sites.SITE_SCOPES (not imported: the CLI starts fast)


class CommandError(Exception):
    """A failure the command reports as one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (the docs promise it), not usage + error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("pharox-integrations").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"pharox-integrations: error: {where}{message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pharox-integrations",
        description="Lease a proxy per request from a managed pharox pool (Scrapy, requests, urllib3, httpx).",
        epilog=_EXIT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")

    demo = verbs.add_parser(
        "demo",
        help="crawl two local sites through real local proxies with every door; print per-proxy and per-site tables",
        epilog=_EXIT_HELP,
    )
    demo.add_argument(
        "--storage", default="memory://", metavar="URL", help="storage of the demo pool (default memory://)"
    )
    demo.add_argument(
        "--pool", type=_pool_name, default="pharox-demo", help="pool the demo (re)creates (default pharox-demo)"
    )
    demo.add_argument("--pages", type=_positive_int, default=24, help="products on the demo site (default 24)")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="only start the demo site and proxies and keep them running (for example_project); Ctrl-C stops",
    )
    demo.add_argument(
        "--site-port", type=_port, default=0, help="with --serve: port of the demo site (default 0: any free port)"
    )
    demo.add_argument(
        "--proxies-file",
        type=Path,
        default=None,
        help="with --serve: write the proxy list there (for PHAROX_PROXIES_FILE)",
    )

    db = verbs.add_parser("db", help="database schema for the SQL storages", epilog=_EXIT_HELP)
    db_verbs = db.add_subparsers(dest="db_verb", metavar="ACTION", required=True)
    init = db_verbs.add_parser("init", help="create or upgrade the schema", epilog=_EXIT_HELP)
    init.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)

    pool = verbs.add_parser("pool", help="import, list, inspect and health-check pools", epilog=_EXIT_HELP)
    pool_verbs = pool.add_subparsers(dest="pool_verb", metavar="ACTION", required=True)

    imp = pool_verbs.add_parser(
        "import", help="add the proxies of a file (plain list or CSV) to a pool", epilog=_EXIT_HELP
    )
    imp.add_argument(
        "file", help="one proxy URL per line, or CSV with a url column and country/source/... ('-' = stdin)"
    )
    imp.add_argument("--pool", type=_pool_name, required=True, help="pool to add to (created if missing)")
    imp.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)
    imp.add_argument("--format", choices=("auto", "list", "csv"), default="auto", help="default: guess from the file")
    imp.add_argument("--max-concurrency", type=_positive_int, default=None, help="leases per proxy (default unlimited)")

    lst = pool_verbs.add_parser("list", help="the pools, or with --pool the proxies of one pool", epilog=_EXIT_HELP)
    lst.add_argument(
        "--pool", type=_pool_name, default=None, help="list the proxies of this pool (default: list the pools)"
    )
    lst.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)
    lst.add_argument("--limit", type=_limit, default=_DEFAULT_LIMIT, metavar="N", help=_LIMIT_HELP)

    stats = pool_verbs.add_parser(
        "stats", help="status, leases and recent health of every proxy of a pool", epilog=_EXIT_HELP
    )
    stats.add_argument("--pool", type=_pool_name, required=True, help="pool to report on")
    stats.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)
    stats.add_argument(
        "--limit",
        type=_limit,
        default=_DEFAULT_LIMIT,
        metavar="N",
        help=_LIMIT_HELP + "; proxies that are not active come first (with --site, then those the site holds off)",
    )
    stats.add_argument(
        "--site",
        type=_site_name,
        default=None,
        metavar="SITE",
        help="also each proxy's standing at this site (a domain, host or URL): banned there, cooling or "
        "politeness delay, seconds left, strikes",
    )
    stats.add_argument(
        "--site-scope",
        choices=_SITE_SCOPES,
        default=None,
        help="what a site is, as your crawlers' PHAROX_SITE_SCOPE says (default: $PHAROX_SITE_SCOPE, else domain)",
    )

    chk = pool_verbs.add_parser(
        "check", help="health-check every proxy of a pool (pharox HealthChecker) and save it", epilog=_EXIT_HELP
    )
    chk.add_argument("--pool", type=_pool_name, required=True, help="pool whose proxies to check")
    chk.add_argument("--storage", default=None, metavar="URL", help=_STORAGE_HELP)
    chk.add_argument(
        "--target",
        type=_http_url,
        required=True,
        metavar="URL",
        help="http(s) page every proxy must fetch, e.g. https://httpbin.org/ip",
    )
    chk.add_argument("--timeout", type=_seconds, default=5.0, help="seconds per check (default 5)")
    chk.add_argument("--concurrency", type=_positive_int, default=20, help="checks at once (default 20)")
    chk.add_argument(
        "--slow-ms", type=_positive_int, default=2000, help="latency in ms above which a proxy is SLOW (default 2000)"
    )
    chk.add_argument(
        "--expect",
        type=_status_codes,
        default=[200],
        metavar="CODES",
        help="accepted status codes, comma-separated (default 200)",
    )
    chk.add_argument(
        "--limit",
        type=_limit,
        default=_DEFAULT_LIMIT,
        metavar="N",
        help=_LIMIT_HELP + "; proxies that failed come first (all are checked)",
    )
    return parser


# Option types: each rejects bad input with what was expected (argparse adds the option name).


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: expected an integer > 0") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer > 0")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of rows >= 0 (0 shows all)")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port 0-65535 (0: any free port)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds > 0, e.g. 5 or 0.5")
    return value


def _pool_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a pool name, e.g. shop")
    return text


def _http_url(text: str) -> str:
    from urllib.parse import urlsplit

    from .exchange import mask_credentials

    try:
        parts = urlsplit(text)
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"{mask_credentials(text)!r} is not an http(s) URL: expected e.g. https://httpbin.org/ip"
        )
    return text


def _site_name(text: str) -> str:
    """The host a `--site` names (a domain, a host, or a URL: its host); never its credentials."""
    from urllib.parse import urlsplit

    name = text.strip()
    host = None
    if name and not any(c.isspace() for c in name):
        try:
            host = urlsplit(name if "://" in name else "//" + name).hostname
        except ValueError:
            host = None
    if not host:
        raise argparse.ArgumentTypeError(
            f"{_without_userinfo(text)!r}: expected a site: a domain, host or URL, e.g. shop.example"
        )
    return host


def _without_userinfo(text: str) -> str:
    """`text` with any ``user:password@`` before its host shown as ``***@``."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}{sep}{authority}{slash}{path}"


def _status_codes(text: str) -> list[int]:
    try:
        codes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        codes = []
    if not codes or not all(100 <= c <= 599 for c in codes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected HTTP status codes 100-599, comma-separated, e.g. 200,204")
    return codes


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
        _err(_storage_message(exc, getattr(args, "storage", None) or os.environ.get("PHAROX_STORAGE_URL", "")))
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
        init_schema(_connect_url(url))
    except StorageUnavailable:
        raise
    except Exception as exc:
        if _from_database(exc):
            raise _database_error(url, exc) from None
        raise
    print(f"schema ready in {safe_storage_url(url)}")
    return EXIT_OK


# ---------------------------------------------------------------------------- storage plumbing


def _storage_url(args: argparse.Namespace) -> str:
    """`--storage` or `$PHAROX_STORAGE_URL`, checked (scheme, driver, form) before anything connects."""
    from .storage import check_storage_url

    url: str | None = args.storage or os.environ.get("PHAROX_STORAGE_URL")
    if not url:
        raise CommandError("no storage: pass --storage URL or set PHAROX_STORAGE_URL")
    if url.startswith(("memory:", "pharox-memory:")):
        raise CommandError(
            f"{url} lives inside one process, so there is nothing to import into or read from here; "
            "use a shared storage: sqlite:///file.db, postgresql+psycopg://…, mysql+pymysql://…"
        )
    try:
        check_storage_url(url)
    except ConfigurationError as exc:
        origin = "" if args.storage else "PHAROX_STORAGE_URL: "
        raise CommandError(f"{origin}{exc}") from None
    return url


def _connect_url(url: str) -> str:
    """The URL the command connects with: PostgreSQL gets a connect timeout unless it has one.

    libpq waits for the TCP stack by default (minutes on a dropped packet); a one-shot
    command should say "unreachable" within seconds.  PyMySQL's default is 10 s already.
    """
    if not url.lower().startswith("postgresql+psycopg://") or "connect_timeout" in url:
        return url
    import sqlalchemy as sa

    with_timeout = sa.make_url(url).update_query_dict({"connect_timeout": str(_CONNECT_TIMEOUT)})
    return with_timeout.render_as_string(hide_password=False)


def _storage_message(exc: StorageUnavailable, url: str) -> str:
    """One line for a storage that cannot be used, naming the URL (never its password).

    The storage's own message ends in "leasing resumes by itself ..." for long-running
    leasing; a one-shot command has nothing to resume, so the line is built from the
    parts the storage attaches (see `storage.sql._failure`).
    """
    from .storage import safe_storage_url

    shown = safe_storage_url(url) if url else "the storage"
    kind = getattr(exc, "kind", None)
    if kind == "no_schema":
        return f"storage {shown} has no pharox schema: run pharox-integrations db init --storage URL"
    reason = getattr(exc, "reason", None)
    if kind == "failed":
        return f"storage {shown} failed: {reason}"
    return f"storage {shown} unavailable: {reason or exc}"


def _from_database(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("sqlalchemy", "psycopg", "pymysql", "sqlite3"))


def _database_error(url: str, exc: BaseException) -> CommandError:
    """A driver error the storage did not translate (not a connection failure): one line, exit 3."""
    import sqlalchemy as sa

    from .storage.sql import SqlStorage, _failure

    try:
        parsed = sa.make_url(url)
    except Exception:  # checked before, so unexpected; still never a traceback for it
        parsed = sa.make_url("sqlite:///unknown")
    failure = _failure(exc, parsed, SqlStorage._describe(parsed))
    return CommandError(_storage_message(failure, url), EXIT_STORAGE)


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


def _open(args: argparse.Namespace, pool: str | None = None, *, site_scope: str = "domain") -> _Opened:
    """The storage behind `--storage`, probed once so failures surface here."""
    from pharox import ProxyManager

    from .broker import LeaseBroker
    from .storage import storage_from_url

    url = _storage_url(args)
    storage = storage_from_url(_connect_url(url))
    try:
        storage.list_pools()
    except Exception as exc:
        _close(storage)
        if _from_database(exc):
            raise _database_error(url, exc) from None
        raise
    return _Opened(LeaseBroker(ProxyManager(storage), pool=pool or "default", site_scope=site_scope), url)


def _guard_db(opened: _Opened, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except Exception as exc:
        if _from_database(exc):
            raise _database_error(opened.url, exc) from None
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
    """Progress of a long command, on stderr (stdout keeps only the result).

    On a terminal one line is rewritten in place, at most ten times a second.  Elsewhere
    (a log file, CI) a compact line is written at each tenth of the work and at the end:
    a log shows the command is alive and how far it got, in at most eleven lines, where
    a bar would write a line per step (20,000 for a large pool).
    """

    def __init__(self, total: int, verb: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.verb = verb
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.stream.isatty()
        self._shown_at = -math.inf
        self._tenth = -1
        self._written = False

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        final = done >= self.total
        if self.tty:
            now = time.monotonic()
            if not final and now - self._shown_at < 0.1:
                return
            self._shown_at = now
        else:
            tenth = 10 * done // self.total
            if not final and tenth == self._tenth:
                return
            self._tenth = tenth
        width = 30
        filled = width * done // self.total
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.verb} {done}/{self.total}{extra}"
        self.stream.write("\r" + line if self.tty else line + "\n")
        self.stream.flush()
        self._written = True

    def finish(self) -> None:
        if self._written and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- list and stats


def _cut(text: str, width: int = _CELL) -> str:
    """`text` in at most `width` characters; a cut shows as a trailing "…"."""
    return text if len(text) <= width else text[: width - 1] + "…"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], right: Collection[int] = (), width: int = _CELL) -> str:
    """A plain-text table; columns in `right` are right-aligned (numbers); cells longer
    than `width` are cut with "…"."""
    cells = [[str(c) for c in head], *[[_cut("-" if c is None else str(c), width) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])])


def _page(items: Sequence[Any], limit: int) -> tuple[Sequence[Any], int]:
    """The first `limit` items (all for 0) and how many were left out."""
    if limit <= 0 or len(items) <= limit:
        return items, 0
    return items[:limit], len(items) - limit


def _more(left_out: int) -> None:
    if left_out:
        print(f"… and {left_out:,} more (use --limit 0 for all)")


def _status(proxy: Any) -> str:
    return str(getattr(proxy.status, "value", proxy.status))


def _safe(proxy: Any) -> str:
    from .settings import format_host

    return f"{getattr(proxy.protocol, 'value', proxy.protocol)}://{format_host(str(proxy.host))}:{proxy.port}"


_STATUSES = ("active", "banned", "inactive", "slow")
_TROUBLE = {"banned": 0, "inactive": 1, "slow": 2}


def _by_address(proxy: Any) -> tuple[int, int, str, int]:
    """IP addresses in numeric order (127.0.0.2 before 127.0.0.10), then host names."""
    host = str(proxy.host)
    try:
        return 0, int(ipaddress.ip_address(host)), "", int(proxy.port)
    except ValueError:
        return 1, 0, host, int(proxy.port)


def _by_trouble(proxy: Any) -> tuple[int, tuple[int, int, str, int]]:
    """Banned, inactive and slow proxies first (what a long listing cut short must show)."""
    return _TROUBLE.get(_status(proxy), len(_TROUBLE)), _by_address(proxy)


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
            names, left_out = _page(broker.pools(), args.limit)
            rows = []
            for name in names:
                proxies = broker.proxies(name)
                counts = Counter(_status(p) for p in proxies)
                leased = sum(1 for p in proxies if p.current_leases)
                rows.append((name, len(proxies), *(counts[s] for s in _STATUSES), leased))
            if not rows:
                print("no pools in this storage (add some with: pharox-integrations pool import FILE --pool NAME)")
                return EXIT_OK
            print(table(("pool", "proxies", "active", "banned", "inactive", "slow", "leased"), rows, range(1, 7)))
            _more(left_out)
            return EXIT_OK
        proxies = sorted(broker.proxies(args.pool), key=_by_address)
        shown, left_out = _page(proxies, args.limit)
        rows2 = [
            (_safe(p), _status(p), p.country, p.source, p.current_leases, p.max_concurrency, _ago(p.checked_at))
            for p in shown
        ]
        print(table(("proxy", "status", "country", "source", "leases", "max", "checked"), rows2, (4, 5)))
        _more(left_out)
        print(f"{len(proxies)} prox{'y' if len(proxies) == 1 else 'ies'} in pool {args.pool!r}")
        return EXIT_OK

    return _guard_db(opened, run)


_HEALTH_PROGRESS = 500  # proxies; fewer are read in well under a second


def _recent_health(storage: Any, proxies: Sequence[Any]) -> dict[Any, list[Any]]:
    """The last 20 health records of each proxy, with progress when that takes a while.

    One query per proxy: the storage API has no bulk read.  That is why `pool stats`
    reads only the rows it shows (`--limit`, 50 by default): 20,000 proxies cost 5-6 s
    on SQLite, 50 a few milliseconds.  Threads do not help (measured: the time is
    client CPU under the GIL, not waiting for the database).
    """
    progress = _Progress(len(proxies), "read health of", enabled=len(proxies) >= _HEALTH_PROGRESS)
    found: dict[Any, list[Any]] = {}
    for proxy in proxies:
        found[proxy.id] = list(storage.list_health_records(proxy.id, limit=20))
        progress.update(len(found))
    progress.finish()
    return found


def _site_scope(args: argparse.Namespace) -> str:
    """`--site-scope`, else `$PHAROX_SITE_SCOPE`, else domain (what the crawlers keyed their holds by)."""
    if args.site_scope:
        return str(args.site_scope)
    scope = os.environ.get("PHAROX_SITE_SCOPE", "").strip().lower() or "domain"
    if scope not in _SITE_SCOPES:
        raise CommandError(f"PHAROX_SITE_SCOPE={scope!r}: expected one of {', '.join(_SITE_SCOPES)}")
    return scope


_STANDING = {"ban": "banned there", "cooldown": "cooling", "delay": "delay"}
_HOLD_RANK = {"ban": 0, "cooldown": 1, "delay": 2}  # with --site: the proxies it holds off first


@dataclass
class _SiteView:
    """One site's holds on the proxies of one pool, read once (`pool stats --site`)."""

    site: str
    holds: dict[Any, Any]  # proxy id -> sites.Hold
    now: float

    def order(self, proxy: Any) -> int:
        hold = self.holds.get(proxy.id)
        return len(_HOLD_RANK) if hold is None else _HOLD_RANK.get(hold.kind, len(_HOLD_RANK))

    def cells(self, proxy: Any) -> tuple[str | None, str | None, int | None]:
        """(standing, seconds left, strikes) of one proxy at the site."""
        hold = self.holds.get(proxy.id)
        if hold is None:
            return ("usable" if _status(proxy) == "active" else None), None, None
        return _STANDING.get(hold.kind, hold.kind), f"{max(0.0, hold.until - self.now):.1f}", hold.strikes

    def summary(self, proxies: Sequence[Any]) -> str:
        """The line `NoProxyAvailable` would build for the site, for the active proxies
        (the counts are those of `broker.health(site=...)`)."""
        active = [p for p in proxies if _status(p) == "active"]
        banned = [self.holds[p.id].until for p in active if p.id in self.holds and self.holds[p.id].kind == "ban"]
        cooling = [self.holds[p.id].until for p in active if p.id in self.holds and self.holds[p.id].kind != "ban"]
        usable = len(active) - len(banned) - len(cooling)
        line = f"site {self.site!r}: {usable} of {len(active)} active prox{'y' if len(active) == 1 else 'ies'} usable"
        for until, label in ((banned, "banned there"), (cooling, "cooling")):
            line += f"; {len(until)} {label}"
            if until:
                line += f", next in {max(0.0, min(until) - self.now):.1f} s"
        return line


def _pool_stats(args: argparse.Namespace) -> int:
    import statistics

    from .exchange import mask_credentials

    scope = _site_scope(args) if args.site else "domain"
    opened = _open(args, args.pool, site_scope=scope)

    def run() -> int:
        broker = opened.broker
        proxies = broker.proxies(args.pool)
        view: _SiteView | None = None
        if args.site:
            site = broker.sites.site_of_name(args.site)
            ids = {p.id for p in proxies}
            holds = {pid: hold for pid, _, hold in broker.sites.in_force(site) if pid in ids}
            view = _SiteView(site, holds, time.time())

        def order(proxy: Any) -> tuple[int, int, tuple[int, int, str, int]]:
            rank, address = _by_trouble(proxy)
            return rank, view.order(proxy) if view is not None else 0, address

        shown, left_out = _page(sorted(proxies, key=order), args.limit)
        health = _recent_health(broker.storage, shown)
        rows = []
        latencies: list[int] = []
        for p in shown:
            records = health[p.id]
            good = [r for r in records if str(getattr(r.status_after, "value", r.status_after)) == "active"]
            lat = [r.latency_ms for r in good if r.latency_ms]
            latencies.extend(lat)
            last = max(records, key=lambda r: r.checked_at) if records else None
            detail = None
            if last is not None:
                after = str(getattr(last.status_after, "value", last.status_after))
                error = mask_credentials(last.error) if last.error else ""
                # The broker's own records already start with the status ("banned: HTTP 403").
                detail = error if error.startswith(f"{after}:") else f"{after}: {error}" if error else after
            at_site = view.cells(p) if view is not None else ()
            rows.append(
                (
                    _safe(p),
                    _status(p),
                    p.current_leases,
                    f"{len(good)}/{len(records)}",
                    statistics.median(lat) if lat else None,
                    _ago(p.checked_at),
                    *at_site,
                    detail,
                )
            )
        by = Counter(_status(p) for p in proxies)
        leased = sum(p.current_leases for p in proxies)
        median = f"{statistics.median(latencies):.0f} ms" if latencies else "-"
        if left_out:
            median += f" (of the {len(shown)} shown)"
        print(
            f"pool {args.pool!r}: {len(proxies)} proxies, {by['active']} active, {by['banned']} banned, "
            f"{by['inactive']} inactive, {by['slow']} slow; {leased} lease(s) in use; median latency {median}"
        )
        if view is not None:
            print(view.summary(proxies))
        if rows:
            head = ["proxy", "status", "leases", "ok/recent", "median ms", "checked"]
            right = [2, 3, 4]
            if view is not None:
                head += ["at site", "left s", "strikes"]
                right += [7, 8]
            print(table((*head, "last"), rows, right))
            _more(left_out)
        return EXIT_OK

    return _guard_db(opened, run)


# ---------------------------------------------------------------------------- pool check


_OPTION_OF = {
    "target_url": "--target",
    "timeout": "--timeout",
    "expected_status_codes": "--expect",
    "slow_threshold_ms": "--slow-ms",
}


def _pool_check(args: argparse.Namespace) -> int:
    from pharox import HealthCheckOptions
    from pydantic import ValidationError

    try:
        options = HealthCheckOptions(
            target_url=args.target,
            timeout=args.timeout,
            expected_status_codes=args.expect,
            slow_threshold_ms=args.slow_ms,
        )
    except ValidationError as exc:  # the option types check first; this is pharox's stricter word
        first = exc.errors()[0]
        option = _OPTION_OF.get(str(first["loc"][0]) if first["loc"] else "", "an option")
        raise CommandError(f"pool check: argument {option}: {first['msg']}") from None
    opened = _open(args, args.pool)

    def run() -> int:
        proxies = opened.broker.proxies(args.pool)
        if not proxies:
            print(f"pool {args.pool!r} has no proxies: nothing to check")
            return EXIT_OK
        results = asyncio.run(_check_all(opened.broker.storage, proxies, options, args.concurrency))
        by_id = {p.id: p for p in proxies}
        failed = sum(str(getattr(r.status, "value", r.status)) != "active" for r in results)

        def order(result: Any) -> tuple[bool, tuple[int, int, str, int]]:
            active = str(getattr(result.status, "value", result.status)) == "active"
            return active, _by_address(by_id[result.proxy_id])

        shown, left_out = _page(sorted(results, key=order), args.limit)
        rows = []
        for result in shown:
            detail = f"HTTP {result.status_code}" if result.status_code else ""
            if result.error_message:
                detail = (detail + " " + result.error_message).strip()
            status = str(getattr(result.status, "value", result.status))
            rows.append((_safe(by_id[result.proxy_id]), status, result.latency_ms, detail))
        print(table(("proxy", "result", "latency ms", "detail"), rows, (2,)))
        _more(left_out)
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
