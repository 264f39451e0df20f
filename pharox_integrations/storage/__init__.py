"""Storages and the storage-URL factory.

`memory://` is the embedded default (one process).  SQL URLs share a pool between
processes and machines.  `pharox-memory://` and `pharox+postgresql+psycopg://` give
pharox's own storages, for comparison in benchmarks.

A URL is checked before anything connects: a typo (`sqlite://pool.db`, `postgres://…`,
a driver that is not installed) is one `ConfigurationError` naming the URL with its
password masked and the forms that work, never a driver's traceback.
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from typing import Any

from pharox import InMemoryStorage, IStorage

from ..errors import ConfigurationError, UnknownStorage

SCHEMES = {
    "memory": "the embedded in-memory storage (one process)",
    "pharox-memory": "pharox's own InMemoryStorage (for comparison; cost grows with the pool)",
    "sqlite": "SQLite file shared by the processes of one machine (pip install 'pharox-integrations[sql]')",
    "postgresql+psycopg": "PostgreSQL, a pool shared by a fleet (pip install 'pharox-integrations[postgres]')",
    "mysql+pymysql": "MariaDB/MySQL via PyMySQL (pip install 'pharox-integrations[mysql]')",
    "pharox+postgresql+psycopg": "pharox's own PostgresStorage (for comparison)",
}
ACCEPTED = "memory://, sqlite:///path/to/pool.db, postgresql+psycopg://user@host/db, mysql+pymysql://user@host/db"
"""The storage URL forms, as every error message about a storage URL lists them."""

# SQL dialect+driver pairs SqlStorage is tested with, and the module and extra each needs.
_DRIVERS = {
    "sqlite": ("sqlite3", "sql"),
    "sqlite+pysqlite": ("sqlite3", "sql"),
    "postgresql+psycopg": ("psycopg", "postgres"),
    "mysql+pymysql": ("pymysql", "mysql"),
}
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<slashes>/*)")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*")


def safe_storage_url(url: str) -> str:
    """The URL with its password replaced by `***`, for messages and logs.

    Everything between the first `:` of the user part and the *last* `@` is masked, so
    a password holding an unescaped `@`, `:` or `/` is hidden whole; so is a
    `password=` query parameter.
    """
    url = _QUERY_SECRET.sub(r"\1***", url)
    match = _SCHEME.match(url)
    head = match.group(0) if match and match.group("slashes") else ""
    rest = url[len(head) :]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{head}{user}:***@{hostpart}"


def is_memory_storage(storage: IStorage) -> bool:
    """True for storages that answer from process memory (never block on I/O)."""
    if isinstance(storage, InMemoryStorage):
        return True
    try:
        from .memory import MemoryStorage
    except ImportError:
        return False
    return isinstance(storage, MemoryStorage)


def storage_from_url(url: str, **options: Any) -> IStorage:
    """Build the storage a URL names; a wrong URL says what is wrong and what works."""
    kind = check_storage_url(url)
    if kind == "memory":
        return _memory_storage(**options)
    if kind == "pharox-memory":
        return InMemoryStorage()
    if kind == "pharox+postgresql":
        return _pharox_postgres(url.removeprefix("pharox+"))
    try:
        from .sql import SqlStorage
    except ImportError as exc:
        raise ConfigurationError(
            f"storage URL {safe_storage_url(url)!r} needs SQLAlchemy: "
            f"pip install 'pharox-integrations[{_DRIVERS[kind][1]}]' ({exc})"
        ) from None
    return SqlStorage(url, **options)


def check_storage_url(url: object) -> str:
    """Check a storage URL without connecting; returns its kind (`memory`, `sqlite`,
    `postgresql+psycopg`, ...).

    Raises `UnknownStorage` (a `ConfigurationError`) for a scheme no storage handles
    and `ConfigurationError` for a malformed URL or a driver that is not installed;
    the message names the URL (password masked) and the accepted forms.
    """
    if not isinstance(url, str) or not url.strip():
        raise UnknownStorage(_unknown(url))
    match = _SCHEME.match(url)
    if match is None and re.search(r"\.(db|sqlite3?)$", url):
        raise UnknownStorage(
            f"storage URL {safe_storage_url(url)!r} has no scheme: for a SQLite file write sqlite:///{url}"
        )
    if match is None or (not match.group("slashes") and match.group("scheme").lower() != "sqlite"):
        raise UnknownStorage(_unknown(url))
    scheme = match.group("scheme").lower()
    if scheme in ("memory", "pharox-memory"):
        return scheme
    if scheme.startswith("pharox+"):
        if _check_sql(url[len("pharox+") :], prefix="pharox+").startswith("postgresql"):
            return "pharox+postgresql"
        raise UnknownStorage(_unknown(url))
    if scheme.split("+", 1)[0] in _SQL_FAMILIES:
        return _check_sql(url)
    raise UnknownStorage(_unknown(url))


_SQL_FAMILIES = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}
_SQL_FAMILIES.update(dict.fromkeys(("pgsql", "psql"), "postgresql+psycopg"))
_SQL_FAMILIES.update(dict.fromkeys(("mysql", "mariadb"), "mysql+pymysql"))


def _check_sql(url: str, prefix: str = "") -> str:
    match = _SCHEME.match(url)
    if match is None:
        raise UnknownStorage(_unknown(prefix + url))
    scheme, slashes = match.group("scheme").lower(), match.group("slashes")
    family = scheme.split("+", 1)[0]
    safe = safe_storage_url(url)
    shown = prefix + safe
    if family == "sqlite":
        path = url[match.end() :].split("?", 1)[0]
        if slashes in ("", "/", "//") and path and path != ":memory:":
            raise UnknownStorage(
                f"storage URL {shown!r} is not a SQLite file URL: write {prefix}sqlite:///{path} "
                "(three slashes, then the path; four for an absolute one: sqlite:////var/lib/pool.db)"
            )
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise ConfigurationError(
                f"storage URL {shown!r} is an in-memory SQLite database, private to one connection: "
                "use memory:// for one process, or sqlite:///path/to/pool.db to share a file"
            )
    elif family not in _SQL_FAMILIES or scheme not in _DRIVERS:
        fixed = prefix + _SQL_FAMILIES.get(family, "postgresql+psycopg") + safe[len(scheme) :]
        raise UnknownStorage(
            f"storage URL {shown!r}: {scheme}:// is not supported, write {fixed} (accepted: {ACCEPTED})"
        )
    _check_parts(url, shown)
    module, extra = _DRIVERS.get(scheme, _DRIVERS["sqlite"])
    for needed in ("sqlalchemy", module):
        if not _installed(needed):
            name = {"sqlalchemy": "SQLAlchemy", "psycopg": "psycopg", "pymysql": "PyMySQL"}.get(needed, needed)
            raise ConfigurationError(f"storage URL {shown!r} needs {name}: pip install 'pharox-integrations[{extra}]'")
    return "sqlite" if family == "sqlite" else scheme


def _check_parts(url: str, shown: str) -> None:
    """Host, port and user parts SQLAlchemy would misread or fail on."""
    if not _installed("sqlalchemy"):
        return
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except (ValueError, sa.exc.ArgumentError):
        raise ConfigurationError(
            f"storage URL {shown!r} cannot be parsed: expected scheme://user:password@host:port/database "
            f"(accepted: {ACCEPTED})"
        ) from None
    if parsed.host and "@" in parsed.host:
        raise ConfigurationError(
            f"storage URL {shown!r} has an '@' in its user name or password: write it as %40 "
            "(percent-encode '@', ':', '/' and '%' there)"
        )
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigurationError(f"storage URL {shown!r} has port {parsed.port}; expected 1-65535")


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _unknown(url: object) -> str:
    shown = safe_storage_url(url) if isinstance(url, str) else repr(url)
    return f"unknown storage URL {shown!r}; supported: {ACCEPTED}"


def _memory_storage(**options: Any) -> IStorage:
    try:
        from .memory import MemoryStorage
    except ImportError:  # until the indexed storage is installed, pharox's own
        return InMemoryStorage()
    return MemoryStorage(**options)


def _pharox_postgres(url: str) -> IStorage:
    try:
        from pharox.storage.postgres import PostgresStorage, metadata
        from sqlalchemy import create_engine
    except ImportError as exc:
        raise ConfigurationError(
            f"storage {safe_storage_url(url)!r} needs pip install 'pharox-integrations[postgres]' ({exc})"
        ) from None
    from sqlalchemy.exc import DBAPIError

    from .sql import SqlStorage, _failure

    engine = create_engine(url, pool_pre_ping=True)
    try:
        metadata.create_all(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise _failure(exc, engine.url, SqlStorage._describe(engine.url)) from exc
    return PostgresStorage(engine)


__all__ = ["ACCEPTED", "SCHEMES", "check_storage_url", "is_memory_storage", "safe_storage_url", "storage_from_url"]
