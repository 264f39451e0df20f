"""Storages and the storage-URL factory.

`memory://` is the embedded default (one process).  SQL URLs share a pool between
processes and machines.  `pharox-memory://` and `pharox+postgresql://` give pharox's
own storages, for comparison in benchmarks.
"""

from __future__ import annotations

from typing import Any

from pharox import InMemoryStorage, IStorage

from ..errors import ConfigurationError, UnknownStorage

SCHEMES = {
    "memory": "the embedded in-memory storage (one process)",
    "pharox-memory": "pharox's own InMemoryStorage (for comparison; cost grows with the pool)",
    "sqlite": "SQLite file shared by the processes of one machine (pip install 'pharox-integrations[sql]')",
    "postgresql": "PostgreSQL, a pool shared by a fleet (pip install 'pharox-integrations[postgres]')",
    "mysql": "MariaDB/MySQL via PyMySQL (pip install 'pharox-integrations[mysql]')",
    "pharox+postgresql": "pharox's own PostgresStorage (for comparison)",
}


def safe_storage_url(url: str) -> str:
    """The URL with any password replaced by `***`, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}" if ":" in userinfo else url


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
    """Build the storage a URL names; unknown schemes say which ones exist."""
    if not isinstance(url, str) or ("://" not in url and not url.startswith("sqlite:")):
        raise UnknownStorage(_unknown(url))
    scheme = url.split(":", 1)[0].lower()
    family = scheme.split("+", 1)[0]
    if scheme == "memory":
        return _memory_storage(**options)
    if scheme == "pharox-memory":
        return InMemoryStorage()
    if scheme == "pharox+postgresql" or scheme.startswith("pharox+postgresql+"):
        return _pharox_postgres(url.removeprefix("pharox+"))
    if family in ("sqlite", "postgresql", "postgres", "mysql", "mariadb"):
        try:
            from .sql import SqlStorage
        except ImportError as exc:
            raise ConfigurationError(
                f"storage {safe_storage_url(url)!r} needs SQLAlchemy and the database driver: "
                f"pip install 'pharox-integrations[{_extra(family)}]' ({exc})"
            ) from None
        return SqlStorage(url, **options)
    raise UnknownStorage(_unknown(url))


def _extra(family: str) -> str:
    return {"sqlite": "sql", "mysql": "mysql", "mariadb": "mysql"}.get(family, "postgres")


def _unknown(url: object) -> str:
    shown = safe_storage_url(url) if isinstance(url, str) else repr(url)
    known = "; ".join(f"{k}:// ({v})" for k, v in SCHEMES.items())
    return f"unknown storage URL {shown!r}; supported: {known}"


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
    engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    return PostgresStorage(engine)


__all__ = ["SCHEMES", "is_memory_storage", "safe_storage_url", "storage_from_url"]
