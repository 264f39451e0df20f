"""A pharox `IStorage` on SQLAlchemy Core for SQLite, PostgreSQL and MariaDB/MySQL.

Why not pharox's `PostgresStorage`: its acquire path is several transactions that race,
a full expired-lease sweep and a pool aggregate on every call, and it slows down as
lease history grows.  Here the hot path is built so its cost does not depend on pool
size or history:

* `create_lease` is one short transaction: a guarded
  ``UPDATE … SET current_leases = current_leases + 1 WHERE … current_leases < max``
  (the guard is what makes over-leasing impossible, on every database) plus the lease
  insert.  Losing the race raises `ProxyUnavailableError`, which the core retries.
* `acquire_lease` (an extension the core prefers when present) picks, locks and leases
  in ONE transaction; PostgreSQL and MariaDB >= 10.6 use ``FOR UPDATE SKIP LOCKED`` so
  concurrent workers spread over different proxies instead of queueing on one row.
* Round-robin is "least recently picked": each proxy carries a pick stamp in the
  database, so every process sharing the database rotates through one pool.
* Expired leases are swept by an indexed query at most once per `cleanup_interval`.
* `get_pool_stats` is cached per pool for `stats_ttl` seconds; this object's own
  leases and releases are applied to the cached numbers at once, so a single process
  sees exact counts and other processes' changes show up within `stats_ttl`.
* Released leases stay (for `get_lease` and audits) but only an index on
  (status, expires_at) is ever used on the hot path, so old rows cost nothing;
  `purge_released_leases` compacts history when wanted.
* Health records live in a ring of `health_history` slots per proxy.
* PostgreSQL runs each operation as ONE statement (data-modifying CTEs) in autocommit
  mode: a lease costs three round trips, not a dozen.  Sessions commit asynchronously
  except the statements that create leases, which switch `synchronous_commit` back on
  for themselves: a crash may lose a release or a health write for a moment (the
  lease then expires), never an acknowledged lease.
* Prebuilt statements: building a SQLAlchemy statement per call costs more than the
  round trip.  Pooled connections are pinged only after a second idle.
* PostgreSQL's hot path (lease, release, health, round-robin find) skips SQLAlchemy's
  execution layer: the same statements, compiled once, run on psycopg connections of
  a small autocommit pool of this object's own (`_PgDirect`), prepared server-side.
  That halves the client CPU per lease, which is what one GIL-bound process runs out
  of.  While anyone listens to the engine's cursor events (tracing), SQLAlchemy runs
  them again, so the listeners miss nothing.
* Errors that mean "the database is unreachable" become one `StorageUnavailable`
  naming the database (never the password); the pool reconnects by itself.

The schema is created by Alembic migrations shipped in ``storage/migrations``
(`init_schema(url)`, or ``create_schema=True``), which also bring an older schema up to
date.  Per-site holds (`site_store`) live in ``pxi_site_holds``, see `sql_sites`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar
from uuid import UUID, uuid4

import sqlalchemy as sa
from pharox import (
    HealthCheckResult,
    InvalidLeaseError,
    IStorage,
    Lease,
    LeaseStatus,
    PoolNotFoundError,
    PoolStatsSnapshot,
    Proxy,
    ProxyFilters,
    ProxyHealthRecord,
    ProxyNotFoundError,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
)
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.elements import ColumnElement

from pharox_integrations.errors import StorageUnavailable
from pharox_integrations.filters import ProtocolFilter

if TYPE_CHECKING:
    from .sql_sites import SqlSiteStore

__all__ = ["SCHEMA_PREFIX", "SqlStorage", "StorageUnavailable", "init_schema"]

SCHEMA_PREFIX = "pxi_"
ALEMBIC_VERSION_TABLE = f"{SCHEMA_PREFIX}alembic_version"
_MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NO_LATENCY = 2_147_483_647  # sorts last; an int column so one index serves LOWEST_LATENCY
_ACTIVE = ProxyStatus.ACTIVE.value
_LEASE_ACTIVE = LeaseStatus.ACTIVE.value
_LEASE_RELEASED = LeaseStatus.RELEASED.value
_CANDIDATE_BATCH = 64  # rows examined per round when a Python predicate must run
# A locking pick that skips locked rows found none while a plain read sees some: other
# transactions hold them for the milliseconds of their commit.  Seconds to wait before
# each new pick: 77 ms in all, where a MariaDB growth held its rows 2-17 ms here.
_LOCKED_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.04)


class _UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Naive UTC in the database, aware UTC in Python (SQLite and MariaDB keep no zone)."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import DATETIME

            return dialect.type_descriptor(DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


# MariaDB's native UUID sorts by byte-swapped groups, not like Python's UUID ordering
# (round-robin and the contract depend on that order): store 32 hex characters there.
_UUID: sa.types.TypeEngine[UUID] = sa.Uuid().with_variant(sa.Uuid(native_uuid=False), "mysql", "mariadb")

# Query-side view of the tables; the DDL lives in the migrations (frozen per revision).
_meta = sa.MetaData()
pools = sa.Table(
    f"{SCHEMA_PREFIX}pools",
    _meta,
    sa.Column("id", _UUID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("description", sa.Text),
)
consumers = sa.Table(
    f"{SCHEMA_PREFIX}consumers",
    _meta,
    sa.Column("id", _UUID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
)
proxies = sa.Table(
    f"{SCHEMA_PREFIX}proxies",
    _meta,
    sa.Column("id", _UUID, primary_key=True),
    sa.Column("pool_id", _UUID, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("protocol", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("checked_at", _UtcDateTime, nullable=False),
    sa.Column("cred_user", sa.String(255)),
    sa.Column("cred_password", sa.String(255)),
    sa.Column("source", sa.String(255)),
    sa.Column("country", sa.String(64)),
    sa.Column("city", sa.String(255)),
    sa.Column("latitude", sa.Float),
    sa.Column("longitude", sa.Float),
    sa.Column("isp", sa.String(255)),
    sa.Column("asn", sa.BigInteger),
    sa.Column("max_concurrency", sa.Integer),
    sa.Column("current_leases", sa.Integer, nullable=False),
    sa.Column("pick_stamp", sa.BigInteger, nullable=False),
    sa.Column("latency_rank", sa.Integer, nullable=False),
    sa.Column("health_seq", sa.BigInteger, nullable=False),
)
leases = sa.Table(
    f"{SCHEMA_PREFIX}leases",
    _meta,
    sa.Column("id", _UUID, primary_key=True),
    sa.Column("proxy_id", _UUID, nullable=False),
    sa.Column("pool_id", _UUID, nullable=False),
    sa.Column("consumer_id", _UUID, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("acquired_at", _UtcDateTime, nullable=False),
    sa.Column("expires_at", _UtcDateTime, nullable=False),
    sa.Column("released_at", _UtcDateTime),
)
health = sa.Table(
    f"{SCHEMA_PREFIX}health",
    _meta,
    sa.Column("proxy_id", _UUID, primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("record_id", _UUID, nullable=False),
    sa.Column("checked_at", _UtcDateTime, nullable=False),
    sa.Column("reachable", sa.Boolean, nullable=False),
    sa.Column("latency_ms", sa.Integer),
    sa.Column("protocol", sa.String(16), nullable=False),
    sa.Column("status_before", sa.String(16)),
    sa.Column("status_after", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(row: dict[str, Any]) -> dict[str, Any]:
    """A proxy row read by psycopg directly: `checked_at` back to aware UTC."""
    checked = row.get("checked_at")
    if checked is not None and checked.tzinfo is None:
        row["checked_at"] = checked.replace(tzinfo=timezone.utc)
    return row


def _stamp() -> int:
    """Pick stamp for round-robin: microseconds, comparable across local processes."""
    return time.time_ns() // 1000


def _guarded(
    method: Callable[Concatenate[SqlStorage, _P], _R],
) -> Callable[Concatenate[SqlStorage, _P], _R]:
    """Turn "the database is unreachable" into one clear `StorageUnavailable`."""

    @functools.wraps(method)
    def wrapper(self: SqlStorage, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except DBAPIError as exc:
            if _NO_TABLE.search(str(exc.orig)):
                raise self._no_schema() from exc
            if isinstance(exc, (OperationalError, InterfaceError)):
                raise self._unavailable(exc) from exc
            if exc.connection_invalidated:
                raise self._unavailable(exc) from exc
            raise

    return wrapper


# "relation … does not exist" (PostgreSQL), "no such table" (SQLite), "Table … doesn't exist" (MySQL)
_NO_TABLE = re.compile(r"relation \S+ does not exist|no such table|Table \S+ doesn't exist", re.I)
# A server that answers but will not let us in: these never heal by waiting.
_NO_DATABASE = re.compile(r"database \"(?P<pg>[^\"]*)\" does not exist|Unknown database '(?P<my>[^']*)'", re.I)
_LOGIN = re.compile(
    r"role \"(?P<pg_role>[^\"]*)\" does not exist"
    r"|password authentication failed for user \"(?P<pg_user>[^\"]*)\""
    r"|no pg_hba\.conf entry for host \S+, user \"(?P<hba_user>[^\"]*)\""
    r"|permission denied for database"
    r"|Access denied for user '(?P<my_user>[^']*)'",
    re.I,
)
_SQLITE_CANNOT_OPEN = re.compile(r"unable to open database file", re.I)
# libpq's framing around the server's own words
_PG_NOISE = re.compile(
    r"connection failed: |connection to server at \"[^\"]*\"(?: \([^)]*\))?, port \d+ failed: |FATAL:\s+"
)


def _failure(exc: BaseException, url: sa.URL, where: str) -> StorageUnavailable:
    """The one `StorageUnavailable` for a database that cannot be used, naming why.

    Besides its message (for logs and tracebacks) it carries `database` (where),
    `kind` ("unreachable", "no_database", "login", "no_schema" or "failed"), `reason`
    (why, without the where) and `transient` (True when waiting can help), so a
    command line can word its own one-line error.  Never the password.
    """
    orig = getattr(exc, "orig", None) or exc
    text = _scrub(str(orig), url)
    detail = _short(text, orig)
    kind_name = type(orig).__name__
    if found := _NO_DATABASE.search(text):
        name = found.group("pg") or found.group("my") or url.database or ""
        kind = "no_database"
        reason = f"the server has no database {name!r}: create it, or fix the database name in the storage URL"
    elif found := _LOGIN.search(text):
        user = next((v for v in found.groupdict().values() if v), None) or url.username or ""
        kind = "login"
        reason = (
            f"the server refused user {user!r} ({detail}): fix the user or password in the storage URL, "
            "or create that user and grant it the database"
        )
    elif url.get_backend_name() == "sqlite" and _SQLITE_CANNOT_OPEN.search(text):
        kind = "no_database"
        reason = f"cannot open the file ({detail}): does its directory exist, may we write there?"
    elif isinstance(exc, (OperationalError, InterfaceError)) or getattr(exc, "connection_invalidated", False):
        kind = "unreachable"
        reason = f"cannot connect ({kind_name}: {detail})"
    else:
        kind = "failed"
        reason = f"{kind_name}: {detail}"
    if kind == "unreachable":
        message = (
            f"proxy storage unavailable: {where} ({kind_name}: {detail}); "
            "leasing resumes by itself once the database answers again"
        )
    else:
        message = f"proxy storage unavailable: {where}: {reason}"
    return _storage_error(message, where=where, kind=kind, reason=reason)


def _storage_error(message: str, *, where: str, kind: str, reason: str) -> StorageUnavailable:
    err = StorageUnavailable(message)
    err.database = where  # type: ignore[attr-defined]
    err.kind = kind  # type: ignore[attr-defined]
    err.reason = reason  # type: ignore[attr-defined]
    err.transient = kind == "unreachable"  # type: ignore[attr-defined]
    return err


def _scrub(text: str, url: sa.URL) -> str:
    """`text` without the URL's password, in any spelling a driver might echo."""
    from urllib.parse import quote, quote_plus

    password = url.password
    if isinstance(password, str) and len(password) >= 3:
        for spelling in {password, quote(password, safe=""), quote_plus(password)}:
            text = text.replace(spelling, "***")
    return re.sub(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\g<scheme>***@", text, flags=re.I)


def _short(text: str, orig: object) -> str:
    """The driver's message in one short line, without libpq's framing."""
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):  # PyMySQL: (code, message)
        text = f"{args[1]} [{args[0]}]"
    text = _PG_NOISE.sub("", text)
    line = "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= 200 else line[:199] + "…"


@dataclass
class _Stats:
    """Cached pool counters, adjusted in place by this object's own leases."""

    pool_id: UUID
    pool_name: str
    total: int
    active: int
    available: int
    leased: int
    leases: int
    fetched: float

    def snapshot(self) -> PoolStatsSnapshot:
        return PoolStatsSnapshot(
            pool_name=self.pool_name,
            total_proxies=self.total,
            active_proxies=self.active,
            available_proxies=max(0, self.available),
            leased_proxies=max(0, self.leased),
            total_leases=max(0, self.leases),
        )


@dataclass(frozen=True)
class _Counts:
    """A proxy's lease counter after a change, to keep cached stats exact."""

    pool_id: UUID
    current: int
    max_concurrency: int | None
    active: bool


class _Moved(Exception):
    """A row changed between its pick and its update (only without row locks)."""


_bp = sa.bindparam


class _Sql:
    """The hot-path statements, built once per dialect flavour.

    A statement object built per call costs SQLAlchemy more than the database round
    trip (construction plus cache-key generation, ~0.4 ms); a prebuilt one has its
    cache key memoised and its SQL compiled once, and psycopg prepares it server-side.
    """

    def __init__(self, returning: bool, skip_locked: bool) -> None:
        c = proxies.c
        self.returning = returning
        self.skip_locked = skip_locked
        counts = (c.pool_id, c.current_leases, c.max_concurrency, c.status)
        free = sa.or_(c.max_concurrency.is_(None), c.current_leases < c.max_concurrency)
        up = (
            sa.update(proxies)
            .where(c.id == _bp("b_pid"), c.status == _ACTIVE, free)
            .values(current_leases=c.current_leases + 1)
        )
        up_stamp = up.values(pick_stamp=_bp("b_stamp"))
        down = (
            sa.update(proxies)
            .where(c.id == _bp("b_pid"), c.current_leases > 0)
            .values(current_leases=c.current_leases - 1)
        )
        self.up_stamp_plain = up_stamp  # callers that locked the row know the counts
        self.up_many = (  # a block's growth: rows the caller locked
            sa.update(proxies)
            .where(c.id.in_(sa.bindparam("b_pids", expanding=True)), c.status == _ACTIVE, free)
            .values(current_leases=c.current_leases + 1, pick_stamp=_bp("b_stamp"))
        )
        if returning:
            up, up_stamp, down = (s.returning(*counts) for s in (up, up_stamp, down))
        self.up, self.up_stamp, self.down = up, up_stamp, down
        self.counts = sa.select(*counts).where(c.id == _bp("b_pid"))
        self.stamp = sa.update(proxies).where(c.id == _bp("b_pid")).values(pick_stamp=_bp("b_stamp"))
        self.durable = sa.text("SET LOCAL synchronous_commit TO on")
        self.insert_lease = leases.insert()
        self.release = (
            sa.update(leases)
            .where(
                leases.c.id == _bp("b_lid"),
                leases.c.proxy_id == _bp("b_pid"),
                leases.c.status == _LEASE_ACTIVE,
            )
            .values(status=_LEASE_RELEASED, released_at=_bp("b_at"))
        )
        self.proxy_locked = sa.select(proxies).where(c.id == _bp("b_pid")).with_for_update()
        self.health_proxy = (
            sa.update(proxies)
            .where(c.id == _bp("b_pid"))
            .values(status=_bp("b_status"), checked_at=_bp("b_checked"), health_seq=_bp("b_seq"))
        )
        self.health_proxy_latency = self.health_proxy.values(latency_rank=_bp("b_latency"))
        h = health.c
        self.health_slot = (
            sa.update(health)
            .where(h.proxy_id == _bp("b_pid"), h.slot == _bp("b_slot"))
            .values({col: _bp(f"b_{col}") for col in _HEALTH_VALUES})
        )
        self.health_insert = health.insert()
        self.pool_id = sa.select(pools.c.id).where(pools.c.name == _bp("b_pool"))
        self.pool_name = sa.select(pools.c.name).where(pools.c.id == _bp("b_pool_id"))
        self.consumer = sa.select(consumers.c.id).where(consumers.c.name == _bp("b_name"))
        active = c.status == _ACTIVE

        def count(cond: ColumnElement[bool]) -> Any:
            return sa.func.coalesce(sa.func.sum(sa.case((cond, 1), else_=0)), 0)

        self.stats = sa.select(
            sa.func.count(),
            count(active),
            count(sa.and_(active, free)),
            count(c.current_leases > 0),
            sa.func.coalesce(sa.func.sum(c.current_leases), 0),
        ).where(c.pool_id == _bp("b_pool_id"))
        self.picks: dict[tuple[Any, ...], Any] = {}
        self.pg = _PgSql() if returning and skip_locked else None


class _PgSql:
    """PostgreSQL: whole operations as one statement (data-modifying CTEs).

    Run in autocommit mode they cost one round trip instead of four or five
    (BEGIN, statements, COMMIT), which is most of a lease on a busy machine.
    """

    def __init__(self) -> None:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        c, lc, h = proxies.c, leases.c, health.c
        counts = (c.pool_id, c.current_leases, c.max_concurrency, c.status)
        released = (
            sa.update(leases)
            .where(lc.id == _bp("b_lid"), lc.proxy_id == _bp("b_pid"), lc.status == _LEASE_ACTIVE)
            .values(status=_LEASE_RELEASED, released_at=_bp("b_at"))
            .returning(lc.proxy_id)
            .cte("released")
        )
        self.release = (
            sa.update(proxies)
            .where(c.id == released.c.proxy_id, c.current_leases > 0)
            .values(current_leases=c.current_leases - 1)
            .returning(*counts)
        )
        old_row = proxies.alias("old_row")
        old = (
            sa.select(
                old_row.c.id,
                old_row.c.status.label("old_status"),
                old_row.c.health_seq.label("old_seq"),
            )
            .where(old_row.c.id == _bp("b_pid"))
            .with_for_update()
            .cte("old")
        )
        latency = sa.bindparam("b_latency", type_=sa.Integer)
        updated = (
            sa.update(proxies)
            .where(c.id == old.c.id)
            .values(
                status=_bp("b_status"),
                checked_at=_bp("b_checked", type_=_UtcDateTime()),
                health_seq=old.c.old_seq + 1,
                latency_rank=sa.func.coalesce(latency, c.latency_rank),
            )
            .returning(*proxies.c, old.c.old_status)
            .cte("updated")
        )
        ring = pg_insert(health).from_select(
            ["proxy_id", "slot", *_HEALTH_VALUES],
            sa.select(
                updated.c.id,
                updated.c.health_seq % sa.bindparam("b_ring", type_=sa.Integer),
                updated.c.health_seq,
                sa.bindparam("b_record_id", type_=_UUID),
                sa.bindparam("b_checked", type_=_UtcDateTime()),
                sa.bindparam("b_reachable", type_=sa.Boolean),
                sa.bindparam("b_latency_ms", type_=sa.Integer),
                sa.bindparam("b_protocol", type_=sa.String),
                updated.c.old_status,
                sa.bindparam("b_status", type_=sa.String),
                sa.bindparam("b_status_code", type_=sa.Integer),
                sa.bindparam("b_attempts", type_=sa.Integer),
                sa.bindparam("b_error", type_=sa.Text),
            ),
        )
        ring = ring.on_conflict_do_update(
            index_elements=[h.proxy_id, h.slot],
            set_={col: ring.excluded[col] for col in _HEALTH_VALUES},
        )
        self.health = sa.select(updated).add_cte(ring.cte("ring"))
        self.leases: dict[tuple[Any, ...], Any] = {}

    def lease(self, candidates: sa.Select[Any] | None, key: tuple[Any, ...]) -> Any:
        """Count and insert a lease in one statement: on the first free candidate
        (SKIP LOCKED) or, without `candidates`, on proxy `b_pid` if it has a slot."""
        stmt = self.leases.get(key)
        if stmt is not None:
            return stmt
        c = proxies.c
        if candidates is None:
            target: ColumnElement[bool] = c.id == _bp("b_pid")
            values: dict[str, Any] = {"current_leases": c.current_leases + 1}
        else:
            pick = candidates.with_only_columns(c.id).limit(1).with_for_update(skip_locked=True)
            target = c.id == pick.scalar_subquery()
            values = {"current_leases": c.current_leases + 1, "pick_stamp": _bp("b_stamp")}
        picked = (
            sa.update(proxies)
            .where(
                target,
                c.status == _ACTIVE,
                sa.or_(c.max_concurrency.is_(None), c.current_leases < c.max_concurrency),
            )
            .values(values)
            .returning(c.id, c.pool_id, c.current_leases, c.max_concurrency, c.status)
            .cte("picked")
        )
        lease = sa.insert(leases).from_select(
            ["id", "proxy_id", "pool_id", "consumer_id", "status", "acquired_at", "expires_at"],
            sa.select(
                sa.bindparam("b_lid", type_=_UUID),
                picked.c.id,
                picked.c.pool_id,
                sa.bindparam("b_cid", type_=_UUID),
                sa.literal(_LEASE_ACTIVE),
                sa.bindparam("b_acquired", type_=_UtcDateTime()),
                sa.bindparam("b_expires", type_=_UtcDateTime()),
            ),
        )
        # The session commits asynchronously (see make_engine); a lease must survive a
        # crash, so this one statement-transaction switches the flush back on.
        durable = sa.func.set_config("synchronous_commit", "on", sa.true()).is_not(None)
        stmt = sa.select(picked).add_cte(lease.cte("lease")).where(durable)
        self.leases[key] = stmt
        return stmt

    def stamp(self, candidates: sa.Select[Any], key: tuple[Any, ...]) -> Any:
        """Round-robin find: pick the least recently picked free proxy and stamp it."""
        stmt = self.leases.get(key)
        if stmt is None:
            c = proxies.c
            pick = candidates.with_only_columns(c.id).limit(1).with_for_update(skip_locked=True)
            stmt = (
                sa.update(proxies)
                .where(c.id == pick.scalar_subquery())
                .values(pick_stamp=_bp("b_stamp"))
                .returning(*proxies.c)
            )
            self.leases[key] = stmt
        return stmt


class _PgDirect:
    """PostgreSQL hot path on psycopg itself, with its own small autocommit pool.

    Measured on the one-statement lease, health and release operations: through a
    SQLAlchemy `Connection` a lease cycle cost ~1.1 ms of client CPU (checkout,
    isolation-level switching, execution context, result wrapping), on psycopg with
    the same SQL ~0.3 ms, and one Python process is GIL-bound on exactly this.  The
    SQL still comes from the SQLAlchemy statements above, compiled once; errors are
    wrapped like SQLAlchemy's (`DBAPIError`), so `_guarded` treats both paths alike.
    """

    def __init__(self, engine: Engine, size: int) -> None:
        import psycopg

        self._psycopg = psycopg
        self._dialect = engine.dialect
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        self._cargs = tuple(cargs)
        self._cparams = dict(cparams)
        self._keep = max(1, size)
        self._limit = 2 * self._keep  # like pool_size + max_overflow
        self._lock = threading.Lock()
        # A counter under the lock, not a Semaphore: threading's is Python code costing
        # a few µs per call, and it is taken and given back on every statement.
        self._freed = threading.Condition(self._lock)
        self._out = 0
        self._waiting = 0
        self._idle: list[tuple[Any, float]] = []
        self._pid = os.getpid()
        # id(statement) -> (statement kept alive, SQL, constant parameters, column names)
        self._compiled: dict[int, tuple[Any, str, dict[str, Any], list[str] | None]] = {}

    def _sql(self, stmt: Any) -> tuple[Any, str, dict[str, Any], list[str] | None]:
        entry = self._compiled.get(id(stmt))
        if entry is None:
            compiled = stmt.compile(dialect=self._dialect)
            sql = str(compiled)
            if "POSTCOMPILE" in sql:
                raise TypeError("a statement for the direct path must not need SQLAlchemy's post-compilation")
            constants = {name: value for name, value in compiled.params.items() if not name.startswith("b_")}
            entry = (stmt, sql, constants, None)
            self._compiled[id(stmt)] = entry
        return entry

    def row(self, stmt: Any, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run one statement in its own transaction; the first row by column name."""
        keep, sql, constants, names = self._sql(stmt)
        conn = None
        try:
            conn = self._checkout()
            cur = conn.execute(sql, {**constants, **params}, prepare=True)
            found = cur.fetchone()
            if names is None and cur.description is not None:
                names = [col.name for col in cur.description]
                self._compiled[id(stmt)] = (keep, sql, constants, names)
        except self._psycopg.Error as exc:
            lost = (
                conn is None
                or conn.broken
                or isinstance(exc, (self._psycopg.OperationalError, self._psycopg.InterfaceError))
            )
            if conn is not None:
                self._checkin(conn, discard=lost)
            if lost:
                self._drop_idle()  # the server went away: the other idle sockets are dead too
            raise DBAPIError.instance(
                sql,
                None,
                exc,
                self._psycopg.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=self._dialect,
            ) from exc
        except BaseException:
            if conn is not None:
                self._checkin(conn, discard=True)  # interrupted mid-statement: state unknown
            raise
        self._checkin(conn)
        if found is None or names is None:
            return None
        return dict(zip(names, found, strict=True))

    def _checkout(self) -> Any:
        if os.getpid() != self._pid:  # a forked child must not share the parent's sockets
            self._lock = threading.Lock()
            self._freed = threading.Condition(self._lock)
            self._idle, self._out, self._waiting, self._pid = [], 0, 0, os.getpid()
        with self._lock:
            if self._out >= self._limit:
                self._waiting += 1
                try:
                    if not self._freed.wait_for(lambda: self._out < self._limit, timeout=30):
                        raise sa.exc.TimeoutError(
                            f"all {self._limit} PostgreSQL connections of this storage busy for 30 s"
                        )
                finally:
                    self._waiting -= 1
            self._out += 1
            item = self._idle.pop() if self._idle else None
        try:
            while True:
                if item is None:
                    conn = self._psycopg.connect(*self._cargs, **self._cparams, autocommit=True)
                    # Only lease creation waits for the WAL flush (it switches it on itself).
                    # No sorts: these sessions run only the hot-path statements, whose
                    # picks must walk a selector index.  After an autoanalyze PostgreSQL
                    # misestimated a 10,000-proxy pool as 1 row and sorted the whole pool
                    # per lease instead (33 ms; 1,100 -> 90 leases/s for new sessions).
                    conn.execute("SET synchronous_commit TO off; SET enable_sort TO off")
                    return conn
                conn, used = item
                if time.monotonic() - used < _PING_AFTER_IDLE:
                    return conn
                try:  # idle for a while: make sure the server still knows this session
                    conn.execute("SELECT 1")
                    return conn
                except self._psycopg.Error:
                    conn.close()
                with self._lock:
                    item = self._idle.pop() if self._idle else None
        except BaseException:
            self._give_back()
            raise

    def _checkin(self, conn: Any, *, discard: bool = False) -> None:
        if not discard and not conn.closed:
            used = time.monotonic()
            with self._lock:
                if len(self._idle) < self._keep:
                    self._idle.append((conn, used))
                    self._out -= 1
                    if self._waiting:
                        self._freed.notify()
                    return
        try:
            conn.close()
        finally:
            self._give_back()

    def _give_back(self) -> None:
        with self._lock:
            self._out -= 1
            if self._waiting:
                self._freed.notify()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def close(self) -> None:
        """Close the idle connections (ones in use close when they come back)."""
        self._drop_idle()


_SQL_CACHE: dict[tuple[str, bool, bool], _Sql] = {}
_SQL_LOCK = threading.Lock()

_HEALTH_VALUES = (
    "seq",
    "record_id",
    "checked_at",
    "reachable",
    "latency_ms",
    "protocol",
    "status_before",
    "status_after",
    "status_code",
    "attempts",
    "error",
)


def make_engine(url: str | sa.URL, *, pool_size: int = 20) -> Engine:
    """An engine tuned for short leasing transactions on any of the three databases."""
    url = sa.make_url(url)
    kwargs: dict[str, Any] = {"hide_parameters": True}
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database in (None, "", ":memory:") or url.database.startswith("file::memory:"):
            raise ValueError(
                "SqlStorage needs a SQLite file (sqlite:///path/to/file.db): an in-memory "
                "database is private to one connection; use memory:// instead"
            )
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs["pool_recycle"] = 1800
    if backend in ("mysql", "mariadb"):
        kwargs["isolation_level"] = "READ COMMITTED"
    kwargs["pool_size"] = pool_size
    kwargs["max_overflow"] = pool_size
    kwargs["pool_timeout"] = 30
    engine = sa.create_engine(url, **kwargs)
    _prepare_engine(engine)
    if backend != "sqlite":
        _ping_when_idle(engine)
    if backend == "postgresql":

        @event.listens_for(engine, "connect")
        def _relaxed_commits(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
            # Only lease creation needs to wait for the WAL flush (it switches it back
            # on per transaction); stamps, health and releases need not, which saves
            # an fsync each.  A crash can lose the last few of those, never a lease.
            cur = dbapi_conn.cursor()
            cur.execute("SET synchronous_commit TO off")
            cur.close()
            dbapi_conn.commit()

    return engine


_PING_AFTER_IDLE = 1.0  # seconds


def _ping_when_idle(engine: Engine) -> None:
    """`pool_pre_ping`, but only for connections idle longer than a second.

    A ping is a round trip on every checkout, a sixth of a lease's database work.  A
    connection used a moment ago is almost always alive; if the server restarted in
    that moment the statement fails, SQLAlchemy recycles the whole pool and that one
    call raises `StorageUnavailable`, which callers retry anyway.
    """

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, proxy: Any) -> None:
        if time.monotonic() - record.info.get("pxi_used", 0.0) < _PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            if engine.dialect.is_disconnect(exc, dbapi_conn, None):
                # The pool discards this connection and checks out a fresh one.
                raise sa.exc.DisconnectionError() from exc
            raise

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: DBAPIConnection | None, record: ConnectionPoolEntry) -> None:
        record.info["pxi_used"] = time.monotonic()


def _prepare_engine(engine: Engine) -> None:
    """SQLite: WAL, foreign keys, and writers that take the lock up front (no deadlocks)."""
    if engine.dialect.name != "sqlite" or getattr(engine, "_pxi_prepared", False):
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        # Take transaction control away from pysqlite so BEGIN IMMEDIATE below is ours.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that later writes can fail with SQLITE_BUSY without
        # waiting; reads opt out with execution_options(pxi_read=True).
        if conn.get_execution_options().get("pxi_read"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine._pxi_prepared = True  # type: ignore[attr-defined]


def _run_migrations(engine: Engine, revision: str = "head") -> None:
    """Upgrade to `revision` (tests stop at an old one to check the upgrade path)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        config.attributes["version_table"] = ALEMBIC_VERSION_TABLE
        command.upgrade(config, revision)
        if conn.in_transaction():
            conn.commit()


def init_schema(url: str | sa.URL | Engine) -> None:
    """Create or upgrade the SqlStorage tables (Alembic ``upgrade head``); idempotent."""
    if isinstance(url, Engine):
        _prepare_engine(url)
        try:
            _run_migrations(url)
        except DBAPIError as exc:
            raise _failure(exc, url.url, SqlStorage._describe(url.url)) from exc
        return
    engine = make_engine(url, pool_size=1)
    try:
        _run_migrations(engine)
    except DBAPIError as exc:
        raise _failure(exc, engine.url, SqlStorage._describe(engine.url)) from exc
    finally:
        engine.dispose()


class SqlStorage(IStorage):
    """Shared proxy pool in a SQL database; safe for many threads and processes.

    `url_or_engine` is a SQLAlchemy URL (``sqlite:///file.db``,
    ``postgresql+psycopg://…``, ``mysql+pymysql://…``) or a ready `Engine`.
    """

    def __init__(
        self,
        url_or_engine: str | sa.URL | Engine,
        *,
        create_schema: bool = False,
        pool_size: int = 20,
        stats_ttl: float = 1.0,
        cleanup_interval: float = 1.0,
        health_history: int = 20,
    ) -> None:
        if isinstance(url_or_engine, Engine):
            self._engine = url_or_engine
            self._owns_engine = False
            _prepare_engine(self._engine)
        else:
            self._engine = make_engine(url_or_engine, pool_size=pool_size)
            self._owns_engine = True
        self._dialect = self._engine.dialect.name
        self._where = self._describe(self._engine.url)
        self._stats_ttl = stats_ttl
        self._cleanup_interval = cleanup_interval
        self._health_history = max(1, health_history)
        self._lock = threading.Lock()
        self._stats: dict[UUID, _Stats] = {}
        self._consumer_ids: dict[str, UUID] = {}
        self._pool_names: dict[UUID, str] = {}
        self._next_cleanup = 0.0
        self._q = self._statements()
        self._direct: _PgDirect | None = None
        if self._q.pg is not None:
            size = self._engine.pool.size() if isinstance(self._engine.pool, sa.pool.QueuePool) else pool_size
            self._direct = _PgDirect(self._engine, size)
            # Close its sockets when this object goes away unclosed (no ResourceWarning).
            weakref.finalize(self, self._direct.close)
        self._site_store: SqlSiteStore | None = None
        self._writer_lock: threading.Lock | None = None
        if self._dialect == "sqlite":
            # One lock per engine, shared by every storage object on it.
            self._writer_lock = self._engine.__dict__.setdefault("_pxi_writer", threading.Lock())
        if create_schema:
            try:
                _run_migrations(self._engine)
            except DBAPIError as exc:
                raise self._unavailable(exc) from exc

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _describe(url: sa.URL) -> str:
        if url.get_backend_name() == "sqlite":
            return f"sqlite file {url.database}"
        port = f":{url.port}" if url.port else ""
        return f"{url.get_backend_name()} at {url.host or 'localhost'}{port}/{url.database or ''}"

    def _unavailable(self, exc: DBAPIError) -> StorageUnavailable:
        return _failure(exc, self._engine.url, self._where)

    def _no_schema(self) -> StorageUnavailable:
        return _storage_error(
            f"no pharox-integrations schema in {self._where}: create it once with "
            "`pharox-integrations db init --storage URL` (or SqlStorage(url, create_schema=True))",
            where=self._where,
            kind="no_schema",
            reason="no pharox-integrations schema",
        )

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests, admin tools and migrations)."""
        return self._engine

    def site_store(self) -> SqlSiteStore:
        """The per-site holds on this database, shared with every process using it (one
        store per storage object, so all its brokers share one view and one statement set)."""
        store = self._site_store
        if store is None:
            from .sql_sites import SqlSiteStore  # imports this module: not at the top

            with self._lock:
                if self._site_store is None:
                    self._site_store = SqlSiteStore(self)
                store = self._site_store
        return store

    def close(self) -> None:
        """Close pooled connections (only when this object created the engine)."""
        if self._direct is not None:
            self._direct.close()
        if self._owns_engine:
            self._engine.dispose()

    def __repr__(self) -> str:
        return f"SqlStorage({self._where})"

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A write transaction.  SQLite: threads of this process queue on a lock
        instead of on SQLite's busy handler, which sleeps in steps of milliseconds."""
        if self._writer_lock is None:
            with self._engine.begin() as conn:
                yield conn
        else:
            with self._writer_lock, self._engine.begin() as conn:
                yield conn

    def _read(self) -> Any:
        return self._engine.connect().execution_options(pxi_read=True)

    def _autocommit(self) -> Connection:
        """PostgreSQL: each statement its own transaction, with no BEGIN/COMMIT trips."""
        return self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def _pg_statement(
        self,
        kind: str,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
    ) -> Any:
        """The one-statement PostgreSQL form, when the filters allow a cached one."""
        pg = self._q.pg
        if pg is None:
            return None
        protocols = self._simple_filters(filters)
        if protocols is None:
            return None
        key = (kind, selector, protocols)
        stmt = pg.leases.get(key)
        if stmt is None:
            candidates, _ = self._candidates(filters, selector)
            stmt = pg.stamp(candidates, key) if kind == "find" else pg.lease(candidates, key)
        return stmt

    def _pg_row(self, stmt: Any, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run a one-statement PostgreSQL operation in autocommit mode; the first row.

        Datetime parameters are naive UTC (what the columns hold).  Direct on psycopg,
        unless someone listens to this engine's cursor events (tracing, tests that
        watch which thread queries): then through SQLAlchemy, so they see every
        statement, at SQLAlchemy's cost.
        """
        direct = self._direct
        dispatch = self._engine.dispatch
        if direct is not None and not dispatch.before_cursor_execute and not dispatch.after_cursor_execute:
            return direct.row(stmt, params)
        with self._autocommit() as conn:
            found = conn.execute(stmt, params).mappings().first()
        return None if found is None else dict(found)

    def _pg_lease(
        self, stmt: Any, params: dict[str, Any], consumer_id: UUID, seconds: int
    ) -> tuple[Lease, _Counts] | None:
        acquired = _now()
        lease_id = uuid4()
        expires = acquired + timedelta(seconds=seconds)
        params.update(
            b_lid=lease_id,
            b_cid=consumer_id,
            b_acquired=acquired.replace(tzinfo=None),  # the columns hold naive UTC
            b_expires=expires.replace(tzinfo=None),
        )
        row = self._pg_row(stmt, params)
        if row is None:
            return None
        pool_id = row["pool_id"]
        counts = _Counts(pool_id, row["current_leases"], row["max_concurrency"], row["status"] == _ACTIVE)
        pool_name = self._pool_names.get(pool_id)
        if pool_name is None:
            with self._read() as conn:
                pool_name = self._pool_name(conn, pool_id)
        # Every field is typed already: skip pydantic's validation (a tenth of the CPU).
        lease = Lease.model_construct(
            id=lease_id,
            proxy_id=row["id"],
            consumer_id=consumer_id,
            pool_id=pool_id,
            pool_name=pool_name,
            acquired_at=acquired,
            expires_at=expires,
        )
        return lease, counts

    def _statements(self) -> _Sql:
        """Prebuilt statements for this engine's dialect (shared by storage objects)."""
        dialect = self._engine.dialect
        if self._dialect == "postgresql":
            skip_locked = True
        elif self._dialect in ("mysql", "mariadb"):
            # SKIP LOCKED needs MariaDB >= 10.6 / MySQL >= 8; the version is known once
            # the dialect has seen a connection.
            if dialect.server_version_info is None:
                with contextlib.suppress(DBAPIError):  # down now: assume a current server
                    self._engine.connect().close()
            version = dialect.server_version_info or (99,)
            is_maria = bool(getattr(dialect, "is_mariadb", False))
            skip_locked = version >= ((10, 6) if is_maria else (8, 0))
        else:
            skip_locked = False  # SQLite: BEGIN IMMEDIATE already serialises writers
        returning = self._dialect in ("postgresql", "sqlite")
        key = (self._dialect, returning, skip_locked)
        with _SQL_LOCK:
            sql = _SQL_CACHE.get(key)
            if sql is None:
                sql = _SQL_CACHE[key] = _Sql(returning, skip_locked)
        return sql

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _proxy_from_row(row: RowMapping | Mapping[str, Any]) -> Proxy:
        data: dict[str, Any] = {
            key: row[key]
            for key in (
                "id",
                "pool_id",
                "host",
                "port",
                "protocol",
                "status",
                "checked_at",
                "source",
                "country",
                "city",
                "latitude",
                "longitude",
                "isp",
                "asn",
                "max_concurrency",
                "current_leases",
            )
        }
        if row["cred_user"] is not None:
            data["credentials"] = {"user": row["cred_user"], "password": row["cred_password"]}
        return Proxy.model_validate(data)

    @staticmethod
    def _proxy_values(proxy: Proxy) -> dict[str, Any]:
        creds = proxy.credentials
        return {
            "pool_id": proxy.pool_id,
            "host": str(proxy.host),
            "port": proxy.port,
            "protocol": ProxyProtocol(proxy.protocol).value,
            "status": ProxyStatus(proxy.status).value,
            "checked_at": proxy.checked_at,
            "cred_user": creds.user if creds else None,
            "cred_password": creds.password if creds else None,
            "source": proxy.source,
            "country": proxy.country,
            "city": proxy.city,
            "latitude": proxy.latitude,
            "longitude": proxy.longitude,
            "isp": proxy.isp,
            "asn": proxy.asn,
            "max_concurrency": proxy.max_concurrency,
        }

    def _lease_from_row(self, conn: Connection, row: RowMapping) -> Lease:
        return Lease(
            id=row["id"],
            proxy_id=row["proxy_id"],
            consumer_id=row["consumer_id"],
            pool_id=row["pool_id"],
            pool_name=self._pool_name(conn, row["pool_id"]),
            status=LeaseStatus(row["status"]),
            acquired_at=row["acquired_at"],
            expires_at=row["expires_at"],
            released_at=row["released_at"],
        )

    def _pool_name(self, conn: Connection, pool_id: UUID) -> str | None:
        name = self._pool_names.get(pool_id)
        if name is None:
            name = conn.execute(self._q.pool_name, {"b_pool_id": pool_id}).scalar_one_or_none()
            if name is not None:
                self._pool_names[pool_id] = name
        return name

    # ------------------------------------------------------------------ filters

    def _filter_clause(self, filters: ProxyFilters) -> tuple[ColumnElement[bool] | None, bool]:
        """SQL for `filters` and whether it is exact (else Python must re-check).

        An inexact clause is always a superset of the matches, so Python only ever
        narrows the candidates down.
        """
        c = proxies.c
        clauses: list[ColumnElement[bool]] = []
        exact = True
        for attr in ("source", "country", "city", "isp"):
            value = getattr(filters, attr)
            if value:
                clauses.append(c[attr] == value)
        if filters.asn is not None:
            clauses.append(c.asn == filters.asn)
        if filters.latitude is not None and filters.longitude is not None:
            # Bounding box in SQL (index-friendly, cheap); the exact distance in Python.
            exact = False
            radius = filters.radius_km or 0.001
            dlat = radius / 111.0 + 1e-6
            clauses.append(c.latitude.between(filters.latitude - dlat, filters.latitude + dlat))
            clauses.append(c.longitude.is_not(None))
        if filters.predicate is not None:
            if isinstance(filters.predicate, ProtocolFilter):
                allowed = sorted(p.value for p in filters.predicate.protocols)
                # Literal elements, not an "expanding" list: the SQL is then final at
                # compile time, which the direct PostgreSQL path needs.
                clauses.append(c.protocol.in_([sa.literal(p) for p in allowed]))
            else:
                exact = False
        for child in filters.all_of or ():
            clause, child_exact = self._filter_clause(child)
            exact = exact and child_exact
            if clause is not None:
                clauses.append(clause)
        if filters.any_of:
            options: list[ColumnElement[bool]] = []
            unrestricted = False
            for child in filters.any_of:
                clause, child_exact = self._filter_clause(child)
                exact = exact and child_exact
                if clause is None:
                    unrestricted = True
                else:
                    options.append(clause)
            if options and not unrestricted:
                clauses.append(sa.or_(*options))
        for child in filters.none_of or ():
            clause, child_exact = self._filter_clause(child)
            if not child_exact:
                exact = False  # NOT(superset) would drop real matches: leave it to Python
            elif clause is not None:
                clauses.append(sa.not_(clause))
            else:
                clauses.append(sa.false())
        if not clauses:
            return None, exact
        return sa.and_(*clauses), exact

    def _candidates(
        self,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
        *,
        unlimited: bool = False,
    ) -> tuple[sa.Select[Any], bool]:
        """Available proxies of pool `b_pool` (`unlimited`: only those without a
        `max_concurrency`), in selector order; plus "needs Python"."""
        c = proxies.c
        pool_id = self._q.pool_id.scalar_subquery()
        free: ColumnElement[bool] = c.max_concurrency.is_(None)
        if not unlimited:
            free = sa.or_(free, c.current_leases < c.max_concurrency)
        stmt = sa.select(proxies).where(c.pool_id == pool_id, c.status == _ACTIVE, free)
        needs_python = False
        if filters is not None:
            clause, exact = self._filter_clause(filters)
            if clause is not None:
                stmt = stmt.where(clause)
            needs_python = not exact
        strategy = selector or SelectorStrategy.FIRST_AVAILABLE
        if strategy == SelectorStrategy.ROUND_ROBIN:
            order: tuple[Any, ...] = (c.pick_stamp, c.id)
        elif strategy == SelectorStrategy.LEAST_USED:
            order = (c.current_leases, c.checked_at, c.id)
        elif strategy == SelectorStrategy.LOWEST_LATENCY:
            order = (c.latency_rank, c.id)
        else:
            order = (c.id,)
        return stmt.order_by(*order), needs_python

    @staticmethod
    def _simple_filters(filters: ProxyFilters | None) -> frozenset[str] | None:
        """Protocols allowed when `filters` is at most a `ProtocolFilter` (the common
        case, served by a cached statement); None when the filters are richer."""
        if filters is None:
            return frozenset()
        if (
            isinstance(filters.predicate, ProtocolFilter)
            and not filters.source
            and not filters.country
            and not filters.city
            and not filters.isp
            and filters.asn is None
            and filters.latitude is None
            and filters.longitude is None
            and not filters.all_of
            and not filters.any_of
            and not filters.none_of
        ):
            return frozenset(p.value for p in filters.predicate.protocols)
        return None

    def _pick(
        self,
        conn: Connection,
        pool_name: str,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
        *,
        lock: bool,
    ) -> RowMapping | None:
        rows = self._picks(conn, pool_name, filters, selector, lock=lock)
        return rows[0] if rows else None

    def _picks(
        self,
        conn: Connection,
        pool_name: str,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
        *,
        lock: bool,
        limit: int = 1,
        unlimited: bool = False,
    ) -> list[RowMapping]:
        """Up to `limit` available proxies in selector order (`unlimited`: only those
        without a `max_concurrency`)."""
        params = {"b_pool": pool_name}
        protocols = self._simple_filters(filters)
        if protocols is not None:
            key = (selector, protocols, lock, limit, unlimited)
            stmt = self._q.picks.get(key)
            if stmt is None:
                stmt, _ = self._candidates(filters, selector, unlimited=unlimited)
                stmt = stmt.limit(limit)
                if lock:
                    stmt = stmt.with_for_update(skip_locked=self._q.skip_locked)
                self._q.picks[key] = stmt
            return list(conn.execute(stmt, params).mappings().all())
        stmt, needs_python = self._candidates(filters, selector, unlimited=unlimited)
        batch = _CANDIDATE_BATCH if needs_python else limit
        offset = 0
        found: list[RowMapping] = []
        while True:
            page = stmt.limit(batch).offset(offset)
            if lock:
                page = page.with_for_update(skip_locked=self._q.skip_locked)
            rows = conn.execute(page, params).mappings().all()
            for row in rows:
                if not needs_python or filters is None or filters.matches(self._proxy_from_row(row)):
                    found.append(row)
                    if len(found) == limit:
                        return found
            if len(rows) < batch:
                return found
            offset += batch

    # ------------------------------------------------------------------ leasing

    def _consumer_id(self, conn: Connection, name: str) -> UUID:
        cached = self._consumer_ids.get(name)
        if cached is not None:
            return cached
        found = conn.execute(self._q.consumer, {"b_name": name}).scalar_one_or_none()
        if found is None:
            found = uuid4()
            try:
                with conn.begin_nested():
                    conn.execute(consumers.insert().values(id=found, name=name))
            except IntegrityError:  # another process created it first
                found = conn.execute(self._q.consumer, {"b_name": name}).scalar_one()
        self._consumer_ids[name] = found
        return found

    @_guarded
    def ensure_consumer(self, consumer_name: str) -> UUID:
        """Create the consumer if needed; cached, so the per-acquire call is free."""
        cached = self._consumer_ids.get(consumer_name)
        if cached is not None:
            return cached
        with self._tx() as conn:
            return self._consumer_id(conn, consumer_name)

    def _bump(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> _Counts | None:
        """Run a guarded counter change; None when the guard refused it (no free slot)."""
        if self._q.returning:
            row = conn.execute(stmt, params).first()
        else:
            if conn.execute(stmt, params).rowcount != 1:
                return None
            row = conn.execute(self._q.counts, params).first()
        if row is None:
            return None
        return _Counts(row[0], row[1], row[2], row[3] == _ACTIVE)

    def _durable(self, conn: Connection) -> None:
        """Lease creation must survive a database crash (everything else may be lost
        for a moment: a lost release or health write only delays a proxy)."""
        if self._dialect == "postgresql":
            conn.execute(self._q.durable)

    def _insert_lease(
        self,
        conn: Connection,
        proxy_id: UUID,
        pool_id: UUID,
        consumer_id: UUID,
        duration_seconds: int,
    ) -> Lease:
        return self._insert_leases(conn, [(proxy_id, pool_id)], consumer_id, duration_seconds)[0]

    def _insert_leases(
        self,
        conn: Connection,
        targets: Sequence[tuple[UUID, UUID]],
        consumer_id: UUID,
        duration_seconds: int,
    ) -> list[Lease]:
        """Insert one lease per (proxy id, pool id) of `targets`, in one statement."""
        acquired = _now()
        expires = acquired + timedelta(seconds=duration_seconds)
        made = [
            Lease(
                id=uuid4(),
                proxy_id=proxy_id,
                consumer_id=consumer_id,
                pool_id=pool_id,
                pool_name=self._pool_name(conn, pool_id),
                acquired_at=acquired,
                expires_at=expires,
            )
            for proxy_id, pool_id in targets
        ]
        values = [
            {
                "id": lease.id,
                "proxy_id": lease.proxy_id,
                "pool_id": lease.pool_id,
                "consumer_id": consumer_id,
                "status": _LEASE_ACTIVE,
                "acquired_at": acquired,
                "expires_at": expires,
            }
            for lease in made
        ]
        conn.execute(self._q.insert_lease, values[0] if len(values) == 1 else values)
        return made

    @_guarded
    def find_available_proxy(
        self,
        pool_name: str,
        filters: ProxyFilters | None = None,
        selector: SelectorStrategy | None = None,
    ) -> Proxy | None:
        """Find (not lease) a proxy; round-robin also moves the shared rotation on."""
        if selector != SelectorStrategy.ROUND_ROBIN:
            with self._read() as conn:
                row = self._pick(conn, pool_name, filters, selector, lock=False)
                return self._proxy_from_row(row) if row is not None else None
        stmt = self._pg_statement("find", filters, selector)
        if stmt is not None:
            found = self._pg_row(stmt, {"b_pool": pool_name, "b_stamp": _stamp()})
            return self._proxy_from_row(_aware(found)) if found is not None else None
        with self._tx() as conn:
            row = self._pick(conn, pool_name, filters, selector, lock=True)
            if row is None:
                return None
            conn.execute(self._q.stamp, {"b_pid": row["id"], "b_stamp": _stamp()})
            return self._proxy_from_row(row)

    @_guarded
    def create_lease(self, proxy: Proxy, consumer_name: str, duration_seconds: int) -> Lease:
        """Lease `proxy` if it still has a free slot, else `ProxyUnavailableError`."""
        if duration_seconds <= 0:
            raise InvalidLeaseError("duration_seconds must be positive.")
        consumer_id = self.ensure_consumer(consumer_name)
        pg = self._q.pg
        if pg is not None:
            stmt = pg.lease(None, ("create",))
            got = self._pg_lease(stmt, {"b_pid": proxy.id}, consumer_id, duration_seconds)
            if got is None:
                raise ProxyUnavailableError(f"Proxy {proxy.id} is no longer available.")
            lease, counts = got
        else:
            with self._tx() as conn:
                counts_or_none = self._bump(conn, self._q.up, {"b_pid": proxy.id})
                if counts_or_none is None:
                    raise ProxyUnavailableError(f"Proxy {proxy.id} is no longer available.")
                counts = counts_or_none
                lease = self._insert_lease(conn, proxy.id, counts.pool_id, consumer_id, duration_seconds)
        self._count_lease(counts, +1)
        return lease

    @_guarded
    def acquire_lease(
        self,
        pool_name: str,
        consumer_name: str,
        duration_seconds: int,
        filters: ProxyFilters | None = None,
        selector: SelectorStrategy | None = None,
    ) -> Lease | None:
        """Find and lease in ONE transaction (extension; the core prefers it).

        Runs the rate-limited expired-lease sweep first, so callers that bypass
        `pharox.ProxyManager` still get lost leases back.
        """
        if duration_seconds <= 0:
            raise InvalidLeaseError("duration_seconds must be positive.")
        self.cleanup_expired_leases()
        consumer_id = self.ensure_consumer(consumer_name)
        got = self._past_locks(
            lambda: self._lease_one(pool_name, consumer_id, duration_seconds, filters, selector),
            pool_name,
            filters,
            selector,
            unlimited=False,
        )
        if got is None:
            return None
        lease, counts = got
        self._count_lease(counts, +1)
        return lease

    def _lease_one(
        self,
        pool_name: str,
        consumer_id: UUID,
        duration_seconds: int,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
    ) -> tuple[Lease, _Counts] | None:
        stmt = self._pg_statement("acquire", filters, selector)
        if stmt is not None:
            params = {"b_pool": pool_name, "b_stamp": _stamp()}
            return self._pg_lease(stmt, params, consumer_id, duration_seconds)
        with self._tx() as conn:
            self._durable(conn)
            row = self._pick(conn, pool_name, filters, selector, lock=True)
            if row is None:
                return None
            params = {"b_pid": row["id"], "b_stamp": _stamp()}
            if conn.execute(self._q.up_stamp_plain, params).rowcount != 1:
                return None  # only without row locks (old MySQL): the core retries
            # The row is locked (or SQLite's write lock is ours): its counts are current.
            counts = _Counts(
                row["pool_id"],
                int(row["current_leases"]) + 1,
                row["max_concurrency"],
                row["status"] == _ACTIVE,
            )
            return self._insert_lease(conn, row["id"], counts.pool_id, consumer_id, duration_seconds), counts

    def _past_locks(
        self,
        pick: Callable[[], _R],
        pool_name: str,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
        *,
        unlimited: bool,
    ) -> _R:
        """`pick`, again while it finds nothing but a plain read of the same candidates
        finds some.

        A pick skips rows other transactions have locked (SKIP LOCKED), so while
        another process commits its own leases (a few milliseconds) a pool of free
        proxies can look empty.  Taken as empty, that made a lease block count the pool
        as contended for seconds (every slot then released after each request); seen
        at the start of 4 MariaDB crawlers at once.  Empty after the last pause: the
        pool has nothing this call may lease.
        """
        got = pick()
        if not self._q.skip_locked:
            return got
        for pause in _LOCKED_PAUSES:
            if got:
                return got
            with self._read() as conn:
                if not self._picks(conn, pool_name, filters, selector, lock=False, unlimited=unlimited):
                    return got
            time.sleep(pause)
            got = pick()
        return got

    @_guarded
    def acquire_leases(
        self,
        pool_name: str,
        consumer_name: str,
        duration_seconds: int,
        count: int,
        filters: ProxyFilters | None = None,
        selector: SelectorStrategy | None = None,
    ) -> list[tuple[Lease, Proxy]]:
        """Lease up to `count` distinct proxies without a `max_concurrency`, in selector
        order, in ONE transaction, each with its proxy as read (extension: a lease block
        grows by the requests waiting for it at once, not by one round trip each).

        Proxies with a limit are left out: a lease of one kept without a request would
        keep other processes off it.  Fewer (or none) come back when fewer are free.
        No expired-lease sweep first, unlike `acquire_lease`: an expired lease only
        keeps a limited proxy off, and those are not leased here (the block's upkeep
        thread sweeps, off the request's path).
        """
        if duration_seconds <= 0:
            raise InvalidLeaseError("duration_seconds must be positive.")
        if count < 1:
            return []
        consumer_id = self.ensure_consumer(consumer_name)
        try:
            taken = self._past_locks(
                lambda: self._lease_rows(pool_name, consumer_id, duration_seconds, count, filters, selector),
                pool_name,
                filters,
                selector,
                unlimited=True,
            )
        except _Moved:  # only without row locks (old MySQL): the caller leases one at a time
            return []
        for _, counts, _ in taken:
            self._count_lease(counts, +1)
        return [(lease, proxy) for lease, _, proxy in taken]

    def _lease_rows(
        self,
        pool_name: str,
        consumer_id: UUID,
        duration_seconds: int,
        count: int,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
    ) -> list[tuple[Lease, _Counts, Proxy]]:
        taken: list[tuple[Lease, _Counts, Proxy]] = []
        with self._tx() as conn:
            self._durable(conn)
            rows = self._picks(conn, pool_name, filters, selector, lock=True, limit=count, unlimited=True)
            if not rows:
                return []
            ids = [row["id"] for row in rows]
            if conn.execute(self._q.up_many, {"b_pids": ids, "b_stamp": _stamp()}).rowcount != len(ids):
                raise _Moved  # rolls the transaction back
            targets = [(row["id"], row["pool_id"]) for row in rows]
            made = self._insert_leases(conn, targets, consumer_id, duration_seconds)
            for row, lease in zip(rows, made, strict=True):
                # The rows are locked (or SQLite's write lock is ours): their counts are current.
                counts = _Counts(row["pool_id"], int(row["current_leases"]) + 1, None, row["status"] == _ACTIVE)
                taken.append((lease, counts, self._proxy_from_row({**row, "current_leases": counts.current})))
        return taken

    @_guarded
    def release_lease(self, lease: Lease) -> None:
        """Release once: a second release, or one after expiry, changes nothing."""
        released_at = lease.released_at or _now()
        params = {"b_lid": lease.id, "b_pid": lease.proxy_id, "b_at": released_at}
        pg = self._q.pg
        if pg is not None:
            params["b_at"] = released_at.astimezone(timezone.utc).replace(tzinfo=None)
            row = self._pg_row(pg.release, params)
            counts = (
                None
                if row is None
                else _Counts(row["pool_id"], row["current_leases"], row["max_concurrency"], row["status"] == _ACTIVE)
            )
        else:
            with self._tx() as conn:
                if conn.execute(self._q.release, params).rowcount != 1:
                    return
                if self._q.returning or lease.pool_id in self._stats:
                    counts = self._bump(conn, self._q.down, params)
                else:  # nobody reads this pool's cached stats: skip reading the counts back
                    conn.execute(self._q.down, params)
                    counts = None
        if counts is not None:
            self._count_lease(counts, -1)

    @_guarded
    def cleanup_expired_leases(self, *, force: bool = False) -> int:
        """Return expired leases to the pool, at most once per `cleanup_interval`.

        Between sweeps it returns 0 at once: pharox calls this on every acquire, and a
        lost process's lease coming back a second later changes nothing.  `force`
        sweeps now.
        """
        now_mono = time.monotonic()
        with self._lock:
            if not force and now_mono < self._next_cleanup:
                return 0
            self._next_cleanup = now_mono + self._cleanup_interval
        total = 0
        while True:
            swept = self._sweep(500)
            total += swept
            if swept < 500:
                break
        if total:
            with self._lock:
                self._stats.clear()
        return total

    def _sweep(self, limit: int) -> int:
        now = _now()
        with self._tx() as conn:
            expired = conn.execute(
                sa.select(leases.c.id)
                .where(leases.c.status == _LEASE_ACTIVE, leases.c.expires_at <= now)
                .order_by(leases.c.expires_at)
                .limit(limit)
            ).scalars().all()
            if not expired:
                return 0
            self._close_leases(conn, expired, now)
            return len(expired)

    @_guarded
    def release_leases(self, leases_: Sequence[Lease]) -> int:
        """Release many leases in one transaction (extension: a lease block gives its
        slots back in batches).  Leases already released or expired are skipped."""
        if not leases_:
            return 0
        now = _now()
        with self._tx() as conn:
            return self._close_leases(conn, [lease.id for lease in leases_], now)

    def _close_leases(self, conn: Connection, ids: Sequence[UUID], now: datetime) -> int:
        """Mark `ids` released (those still active) and lower their proxies' counts, in
        the caller's transaction."""
        rows = conn.execute(
            sa.select(leases.c.id, leases.c.proxy_id)
            .where(leases.c.id.in_(ids), leases.c.status == _LEASE_ACTIVE)
            .with_for_update(skip_locked=self._q.skip_locked)
        ).all()
        if not rows:
            return 0
        # The rows are ours until commit (FOR UPDATE, or SQLite's write lock taken by
        # BEGIN IMMEDIATE): each is still active and is released once, by this statement.
        conn.execute(
            sa.update(leases)
            .where(leases.c.id.in_([lease_id for lease_id, _ in rows]), leases.c.status == _LEASE_ACTIVE)
            .values(status=_LEASE_RELEASED, released_at=now)
        )
        closed: Counter[UUID] = Counter(proxy_id for _, proxy_id in rows)
        by_count: dict[int, list[UUID]] = {}
        for proxy_id in sorted(closed):  # fixed order: no deadlock between writers
            by_count.setdefault(closed[proxy_id], []).append(proxy_id)
        for n, ids_ in by_count.items():  # one statement per distinct count (usually one)
            conn.execute(
                sa.update(proxies)
                .where(proxies.c.id.in_(ids_))
                .values(
                    current_leases=sa.case(
                        (proxies.c.current_leases >= n, proxies.c.current_leases - n),
                        else_=0,
                    )
                )
            )
        if closed:
            with self._lock:
                self._stats.clear()
        return sum(closed.values())

    @_guarded
    def renew_leases(self, leases_: Sequence[Lease], duration_seconds: int) -> int:
        """Extend many active leases to `duration_seconds` from now, in one statement
        (extension: a lease block's heartbeat).  Returns how many were still active."""
        if not leases_:
            return 0
        expires = _now() + timedelta(seconds=duration_seconds)
        with self._tx() as conn:
            return int(
                conn.execute(
                    sa.update(leases)
                    .where(leases.c.id.in_([lease.id for lease in leases_]), leases.c.status == _LEASE_ACTIVE)
                    .values(expires_at=expires)
                ).rowcount
            )

    @_guarded
    def purge_released_leases(self, older_than: timedelta = timedelta(days=1)) -> int:
        """Delete released leases older than `older_than` (history compaction)."""
        cutoff = _now() - older_than
        with self._tx() as conn:
            return int(
                conn.execute(
                    sa.delete(leases).where(leases.c.status == _LEASE_RELEASED, leases.c.expires_at < cutoff)
                ).rowcount
            )

    # ------------------------------------------------------------------ stats

    def _count_lease(self, counts: _Counts, delta: int) -> None:
        """Apply our own lease change to the cached snapshot so it stays exact for us."""
        with self._lock:
            entry = self._stats.get(counts.pool_id)
            if entry is None:
                return
            before = counts.current - delta
            entry.leases += delta
            if before == 0 and counts.current > 0:
                entry.leased += 1
            elif before > 0 and counts.current == 0:
                entry.leased -= 1
            if counts.active and counts.max_concurrency is not None:
                if before < counts.max_concurrency <= counts.current:
                    entry.available -= 1
                elif counts.current < counts.max_concurrency <= before:
                    entry.available += 1

    def _forget_stats(self, pool_id: UUID | None = None) -> None:
        with self._lock:
            if pool_id is None:
                self._stats.clear()
            else:
                self._stats.pop(pool_id, None)

    @_guarded
    def get_pool_stats(self, pool_name: str) -> PoolStatsSnapshot | None:
        """Pool counters, at most `stats_ttl` seconds old for other processes' changes."""
        now_mono = time.monotonic()
        with self._lock:
            for entry in self._stats.values():
                if entry.pool_name == pool_name and now_mono - entry.fetched < self._stats_ttl:
                    return entry.snapshot()
        with self._read() as conn:
            pool_id = conn.execute(self._q.pool_id, {"b_pool": pool_name}).scalar_one_or_none()
            if pool_id is None:
                return None
            row = conn.execute(self._q.stats, {"b_pool_id": pool_id}).one()
        entry = _Stats(
            pool_id,
            pool_name,
            int(row[0]),
            int(row[1]),
            int(row[2]),
            int(row[3]),
            int(row[4]),
            now_mono,
        )
        with self._lock:
            self._stats[pool_id] = entry
            self._pool_names[pool_id] = pool_name
            return entry.snapshot()

    # ------------------------------------------------------------------ health

    def _record_health(
        self,
        conn: Connection,
        proxy_id: UUID,
        seq: int,
        values: dict[str, Any],
    ) -> None:
        """Write into the proxy's ring of `health_history` slots (bounded table)."""
        slot = seq % self._health_history
        values = {**values, "seq": seq}
        params = {f"b_{k}": v for k, v in values.items()}
        params.update(b_pid=proxy_id, b_slot=slot)
        if conn.execute(self._q.health_slot, params).rowcount == 0:
            conn.execute(self._q.health_insert, {"proxy_id": proxy_id, "slot": slot, **values})

    @_guarded
    def apply_health_check_result(self, result: HealthCheckResult) -> Proxy | None:
        """Store the status and a health record; shared with every process at once."""
        status = ProxyStatus(result.status)
        reachable = status in (ProxyStatus.ACTIVE, ProxyStatus.SLOW)
        record = {
            "record_id": uuid4(),
            "checked_at": result.checked_at,
            "reachable": reachable,
            "latency_ms": result.latency_ms,
            "protocol": ProxyProtocol(result.protocol).value,
            "status_after": status.value,
            "status_code": result.status_code,
            "attempts": result.attempts,
            "error": result.error_message,
        }
        latency = min(max(0, result.latency_ms), _NO_LATENCY - 1) if reachable else None
        pg = self._q.pg
        if pg is not None:
            checked = result.checked_at
            if checked.tzinfo is not None:
                checked = checked.astimezone(timezone.utc).replace(tzinfo=None)
            params = {f"b_{k}": v for k, v in record.items()}
            params.update(
                b_pid=result.proxy_id,
                b_status=status.value,
                b_checked=checked,
                b_latency=latency,
                b_ring=self._health_history,
            )
            found = self._pg_row(pg.health, params)
            if found is None:
                return None
            before = found["old_status"]
            proxy = self._proxy_from_row(_aware(found))
            pool_id = found["pool_id"]
        else:
            with self._tx() as conn:
                row = conn.execute(self._q.proxy_locked, {"b_pid": result.proxy_id}).mappings().first()
                if row is None:
                    return None
                seq = int(row["health_seq"]) + 1
                params = {
                    "b_pid": result.proxy_id,
                    "b_status": status.value,
                    "b_checked": result.checked_at,
                    "b_seq": seq,
                }
                if latency is not None:
                    params["b_latency"] = latency
                    conn.execute(self._q.health_proxy_latency, params)
                else:
                    conn.execute(self._q.health_proxy, params)
                before = row["status"]
                self._record_health(conn, result.proxy_id, seq, {**record, "status_before": before})
            proxy = self._proxy_from_row(row)
            proxy.status = status
            proxy.checked_at = result.checked_at
            pool_id = row["pool_id"]
        if before != status.value:
            self._forget_stats(pool_id)
        return proxy

    @_guarded
    def save_health_record(self, record: ProxyHealthRecord) -> None:
        """Add an observation to the proxy's bounded history (status unchanged)."""
        with self._tx() as conn:
            seq = conn.execute(
                sa.select(proxies.c.health_seq).where(proxies.c.id == record.proxy_id).with_for_update()
            ).scalar_one_or_none()
            if seq is None:
                raise ProxyNotFoundError(f"Proxy {record.proxy_id} not found.")
            seq = int(seq) + 1
            conn.execute(sa.update(proxies).where(proxies.c.id == record.proxy_id).values(health_seq=seq))
            self._record_health(
                conn,
                record.proxy_id,
                seq,
                {
                    "record_id": record.id,
                    "checked_at": record.checked_at,
                    "reachable": record.reachable,
                    "latency_ms": record.latency_ms,
                    "protocol": ProxyProtocol(record.protocol).value,
                    "status_before": record.status_before.value if record.status_before else None,
                    "status_after": ProxyStatus(record.status_after).value,
                    "status_code": None,
                    "attempts": 1,
                    "error": record.error,
                },
            )

    @_guarded
    def list_health_records(self, proxy_id: UUID, limit: int = 100) -> Sequence[ProxyHealthRecord]:
        """Newest first; at most `health_history` are kept per proxy."""
        with self._read() as conn:
            rows = (
                conn.execute(
                    sa.select(health).where(health.c.proxy_id == proxy_id).order_by(health.c.seq.desc()).limit(limit)
                )
                .mappings()
                .all()
            )
        return [
            ProxyHealthRecord(
                id=r["record_id"],
                proxy_id=r["proxy_id"],
                checked_at=r["checked_at"],
                reachable=r["reachable"],
                latency_ms=r["latency_ms"],
                protocol=ProxyProtocol(r["protocol"]),
                status_before=ProxyStatus(r["status_before"]) if r["status_before"] else None,
                status_after=ProxyStatus(r["status_after"]),
                error=r["error"],
            )
            for r in rows
        ]

    @_guarded
    def get_last_health_result(self, proxy_id: UUID) -> HealthCheckResult | None:
        """The newest health record as a `HealthCheckResult`."""
        with self._read() as conn:
            r = (
                conn.execute(
                    sa.select(health).where(health.c.proxy_id == proxy_id).order_by(health.c.seq.desc()).limit(1)
                )
                .mappings()
                .first()
            )
        if r is None:
            return None
        return HealthCheckResult(
            proxy_id=r["proxy_id"],
            status=ProxyStatus(r["status_after"]),
            latency_ms=r["latency_ms"] or 0,
            protocol=ProxyProtocol(r["protocol"]),
            attempts=r["attempts"],
            status_code=r["status_code"],
            checked_at=r["checked_at"],
            error_message=r["error"],
        )

    # ------------------------------------------------------------------ pools & proxies

    @_guarded
    def save_pool(self, pool: ProxyPool) -> None:
        """Insert or update a pool by id."""
        with self._tx() as conn:
            done = conn.execute(
                sa.update(pools).where(pools.c.id == pool.id).values(name=pool.name, description=pool.description)
            ).rowcount
            if done == 0:
                conn.execute(pools.insert().values(id=pool.id, name=pool.name, description=pool.description))
        with self._lock:
            self._pool_names[pool.id] = pool.name
            self._stats.pop(pool.id, None)

    add_pool = save_pool

    @_guarded
    def get_pool(self, pool_id: str) -> ProxyPool:
        """A pool by id, or `PoolNotFoundError`."""
        with self._read() as conn:
            row = conn.execute(sa.select(pools).where(pools.c.id == UUID(str(pool_id)))).first()
        if row is None:
            raise PoolNotFoundError(f"Pool {pool_id!r} not found.")
        return ProxyPool(id=row.id, name=row.name, description=row.description)

    @_guarded
    def get_pool_by_name(self, name: str) -> ProxyPool | None:
        """A pool by name, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(pools).where(pools.c.name == name)).first()
        if row is None:
            return None
        return ProxyPool(id=row.id, name=row.name, description=row.description)

    @_guarded
    def list_pools(self) -> Sequence[ProxyPool]:
        """All pools, by name."""
        with self._read() as conn:
            rows = conn.execute(sa.select(pools).order_by(pools.c.name)).all()
        return [ProxyPool(id=r.id, name=r.name, description=r.description) for r in rows]

    @_guarded
    def delete_pool(self, pool_id: str) -> None:
        """Delete a pool with its proxies, their leases and health records."""
        pid = UUID(str(pool_id))
        with self._tx() as conn:
            proxy_ids = sa.select(proxies.c.id).where(proxies.c.pool_id == pid)
            conn.execute(sa.delete(health).where(health.c.proxy_id.in_(proxy_ids)))
            conn.execute(sa.delete(leases).where(leases.c.pool_id == pid))
            conn.execute(sa.delete(proxies).where(proxies.c.pool_id == pid))
            done = conn.execute(sa.delete(pools).where(pools.c.id == pid)).rowcount
        if done == 0:
            raise PoolNotFoundError(f"Pool {pool_id!r} not found.")
        with self._lock:
            self._pool_names.pop(pid, None)
            self._stats.pop(pid, None)

    @_guarded
    def save_proxy(self, proxy: Proxy) -> None:
        """Insert or update a proxy by id; lease counters stay the storage's own."""
        values = self._proxy_values(proxy)
        with self._tx() as conn:
            pool_ok = conn.execute(sa.select(pools.c.id).where(pools.c.id == proxy.pool_id)).scalar_one_or_none()
            if pool_ok is None:
                raise PoolNotFoundError(f"Pool {proxy.pool_id} not found.")
            done = conn.execute(sa.update(proxies).where(proxies.c.id == proxy.id).values(**values)).rowcount
            if done == 0:
                conn.execute(proxies.insert().values(self._new_proxy_row(proxy)))
        self._forget_stats(proxy.pool_id)

    add_proxy = save_proxy

    def _new_proxy_row(self, proxy: Proxy) -> dict[str, Any]:
        return {
            "id": proxy.id,
            **self._proxy_values(proxy),
            "current_leases": 0,
            "pick_stamp": 0,
            "latency_rank": _NO_LATENCY,
            "health_seq": 0,
        }

    @_guarded
    def add_proxies_bulk(self, proxies_: Sequence[Proxy]) -> int:
        """Insert many proxies in one transaction (executemany)."""
        if not proxies_:
            return 0
        rows = [self._new_proxy_row(p) for p in proxies_]
        with self._tx() as conn:
            for start in range(0, len(rows), 1000):
                conn.execute(proxies.insert(), rows[start : start + 1000])
        for pool_id in {p.pool_id for p in proxies_}:
            self._forget_stats(pool_id)
        return len(rows)

    @_guarded
    def get_proxy(self, proxy_id: str) -> Proxy:
        """A proxy by id, or `ProxyNotFoundError`."""
        with self._read() as conn:
            row = conn.execute(sa.select(proxies).where(proxies.c.id == UUID(str(proxy_id)))).mappings().first()
        if row is None:
            raise ProxyNotFoundError(f"Proxy {proxy_id!r} not found.")
        return self._proxy_from_row(row)

    @_guarded
    def list_proxies(self, pool_id: str) -> Sequence[Proxy]:
        """All proxies of a pool, or `PoolNotFoundError`."""
        pid = UUID(str(pool_id))
        with self._read() as conn:
            if conn.execute(sa.select(pools.c.id).where(pools.c.id == pid)).first() is None:
                raise PoolNotFoundError(f"Pool {pool_id!r} not found.")
            rows = (
                conn.execute(sa.select(proxies).where(proxies.c.pool_id == pid).order_by(proxies.c.id)).mappings().all()
            )
        return [self._proxy_from_row(r) for r in rows]

    @_guarded
    def list_proxies_by_status(self, pool_name: str, statuses: Iterable[ProxyStatus | str]) -> list[Proxy]:
        """Proxies of a pool in the given statuses (indexed; used for revival)."""
        wanted = sorted({ProxyStatus(s).value for s in statuses})
        if not wanted:
            return []
        pool_id = sa.select(pools.c.id).where(pools.c.name == pool_name).scalar_subquery()
        with self._read() as conn:
            rows = (
                conn.execute(
                    sa.select(proxies)
                    .where(proxies.c.pool_id == pool_id, proxies.c.status.in_(wanted))
                    .order_by(proxies.c.id)
                )
                .mappings()
                .all()
            )
        return [self._proxy_from_row(r) for r in rows]

    @_guarded
    def delete_proxy(self, proxy_id: str) -> None:
        """Delete a proxy with its leases and health records."""
        pid = UUID(str(proxy_id))
        with self._tx() as conn:
            conn.execute(sa.delete(health).where(health.c.proxy_id == pid))
            conn.execute(sa.delete(leases).where(leases.c.proxy_id == pid))
            done = conn.execute(sa.delete(proxies).where(proxies.c.id == pid)).rowcount
        if done == 0:
            raise ProxyNotFoundError(f"Proxy {proxy_id!r} not found.")
        self._forget_stats()

    # ------------------------------------------------------------------ leases (admin)

    @_guarded
    def get_lease(self, lease_id: str) -> Lease | None:
        """A lease by id (active or released), or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(leases).where(leases.c.id == UUID(str(lease_id)))).mappings().first()
            return self._lease_from_row(conn, row) if row is not None else None

    @_guarded
    def list_leases(self, consumer_id: str | None = None) -> Sequence[Lease]:
        """Leases, optionally of one consumer (an admin call: it scans the history)."""
        stmt = sa.select(leases).order_by(leases.c.acquired_at)
        if consumer_id is not None:
            stmt = stmt.where(leases.c.consumer_id == UUID(str(consumer_id)))
        with self._read() as conn:
            rows = conn.execute(stmt).mappings().all()
            return [self._lease_from_row(conn, r) for r in rows]

    @_guarded
    def count_active_leases(self, pool_name: str | None = None) -> int:
        """Active lease rows (indexed); for tests, admin tools and the broker's diagnostics."""
        # Served by the (status, expires_at) index: only active rows are read.
        stmt = sa.select(sa.func.count()).select_from(leases).where(leases.c.status == _LEASE_ACTIVE)
        if pool_name is not None:
            pool_id = sa.select(pools.c.id).where(pools.c.name == pool_name).scalar_subquery()
            stmt = stmt.where(leases.c.pool_id == pool_id)
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())
