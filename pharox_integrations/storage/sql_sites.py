"""Per-site holds in the SQL database, so every process and machine on it shares them.

`SqlSiteStore` is the `SiteStore` of a `SqlStorage`: one row per (proxy, site) pair in
``pxi_site_holds`` (created by migration 0002).  A ban one worker records keeps every
other worker's requests away from that site at once, and politeness delays are claimed
atomically so two processes never both send a proxy to a site inside its delay.

Every method is one short transaction of one or two statements on the storage's own
engine and connections, with the storage's error mapping (`StorageUnavailable`, never
a password).  Reads and writes on PostgreSQL run in autocommit mode: each method there
is a single statement, so BEGIN/COMMIT would only add round trips.

`claim` is the one operation whose atomicity matters; how each database gets it:

* PostgreSQL, SQLite: ``INSERT … ON CONFLICT (proxy_id, site) DO UPDATE … WHERE
  until <= :now RETURNING …``.  PostgreSQL re-checks the WHERE against the latest
  committed row after waiting for a concurrent writer, so of N claimers of one pair
  exactly one inserts or updates (a row returned) and the rest see a hold in force (no
  row); SQLite serialises writers with ``BEGIN IMMEDIATE`` anyway.
* MariaDB/MySQL have no conditional upsert whose result says which branch ran (with the
  FOUND_ROWS flag SQLAlchemy sets, "inserted" and "kept as it was" both count 1), so:
  ``UPDATE … WHERE until <= :now`` (InnoDB re-reads the latest committed row under
  READ COMMITTED, so only one of the waiters matches), and when nothing matched, a plain
  INSERT: the unique key lets exactly one concurrent inserter through and makes the
  others fail with a duplicate key, which means "someone holds it".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from ..sites import BAN, DELAY, Hold
from .sql import _NO_TABLE, _UUID, SCHEMA_PREFIX, _storage_error, proxies

if TYPE_CHECKING:
    from .sql import SqlStorage

__all__ = ["SITE_KEY_MAX", "SqlSiteStore", "site_holds"]

SITE_KEY_MAX = 255
"""Characters of a site key the table holds; longer keys are stored digested (`_key`)."""

# Query-side view of the table; its DDL is migration 0002 (frozen there).
site_holds = sa.Table(
    f"{SCHEMA_PREFIX}site_holds",
    sa.MetaData(),
    sa.Column("proxy_id", _UUID, primary_key=True),
    sa.Column("site", sa.String(SITE_KEY_MAX), primary_key=True),
    sa.Column("until", sa.Double(), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("strikes", sa.Integer, nullable=False),
    sa.Column("keep_until", sa.Double(), nullable=False),
)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_bp = sa.bindparam


def _key(site: str) -> str:
    """The stored form of a site key.

    A key longer than the column (never a DNS name: those stop at 253 characters, but a
    malformed URL can yield one) becomes a prefix plus a digest of the whole key, so
    every database behaves alike: PostgreSQL and strict MariaDB would reject it and a
    lenient MariaDB would truncate it, merging distinct sites.  `in_force` reports such
    a site under this stored form.
    """
    if len(site) <= SITE_KEY_MAX:
        return site
    digest = hashlib.sha256(site.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{site[: SITE_KEY_MAX - len(digest) - 1]}#{digest}"


def _hold(row: Any) -> Hold:
    # Normalised: SQLite hands back whatever numeric type was stored.
    return Hold(float(row.until), str(row.kind), int(row.strikes), float(row.keep_until))


def _guarded(
    method: Callable[Concatenate[SqlSiteStore, _P], _R],
) -> Callable[Concatenate[SqlSiteStore, _P], _R]:
    """The storage's error mapping, plus a precise word for a schema that predates holds."""

    @functools.wraps(method)
    def wrapper(self: SqlSiteStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except DBAPIError as exc:
            raise self._failure(exc) from exc

    return wrapper


class SqlSiteStore:
    """`SiteStore` on a `SqlStorage`'s database: holds shared by every process on it.

    Get it with ``storage.site_store()`` (one per storage object).  A hold can only be
    kept for a proxy the storage has (the rows go with their proxy): `put` for an
    unknown proxy does nothing and `claim` returns False (a proxy deleted meanwhile is
    not one to send anywhere).
    """

    #: Reads go to the database: a `SiteBook` reads through its cache.
    local = False

    def __init__(self, storage: SqlStorage) -> None:
        self._storage = storage
        dialect = storage.engine.dialect.name
        self._pg = dialect == "postgresql"
        self._mysql = dialect in ("mysql", "mariadb")
        c = site_holds.c
        self._q_holds = sa.select(c.proxy_id, c.until, c.kind, c.strikes, c.keep_until).where(
            c.site == _bp("b_site"), c.until > _bp("b_now")
        )
        self._q_get = sa.select(c.until, c.kind, c.strikes, c.keep_until).where(
            c.proxy_id == _bp("b_pid"), c.site == _bp("b_site")
        )
        self._q_bans = (
            sa.select(sa.func.count())
            .select_from(site_holds)
            .where(c.proxy_id == _bp("b_pid"), c.kind == BAN, c.until > _bp("b_now"))
        )
        self._q_in_force = sa.select(site_holds).where(c.until > _bp("b_now")).order_by(c.site, c.until)
        self._q_in_force_site = self._q_in_force.where(c.site == _bp("b_site"))
        self._q_purge = sa.delete(site_holds).where(c.keep_until <= _bp("b_now"))
        row: dict[str, Any] = {
            "proxy_id": _bp("b_pid"),
            "site": _bp("b_site"),
            "until": _bp("b_until"),
            "kind": _bp("b_kind"),
            "strikes": _bp("b_strikes"),
            "keep_until": _bp("b_keep"),
        }
        # The longer of the two keep_until's: strikes outlive a short politeness hold.
        keep = sa.case((c.keep_until > _bp("b_until"), c.keep_until), else_=_bp("b_until"))
        self._q_put: Any
        self._q_claim: Any = None
        if self._mysql:
            from sqlalchemy.dialects import mysql

            my = mysql.insert(site_holds).values(row)
            self._q_put = my.on_duplicate_key_update(
                until=my.inserted.until,
                kind=my.inserted.kind,
                strikes=my.inserted.strikes,
                keep_until=my.inserted.keep_until,
            )
            # MySQL evaluates SET left to right, later ones seeing earlier results: `keep`
            # reads only keep_until itself and the parameter, never the new `until`.
            self._q_claim_update = (
                sa.update(site_holds)
                .where(c.proxy_id == _bp("b_pid"), c.site == _bp("b_site"), c.until <= _bp("b_now"))
                .values(until=_bp("b_until"), kind=DELAY, keep_until=keep)
            )
            self._q_claim_insert = sa.insert(site_holds).values(row)
        else:
            from sqlalchemy.dialects import postgresql, sqlite

            ins: postgresql.Insert | sqlite.Insert = (postgresql.insert if self._pg else sqlite.insert)(
                site_holds
            ).values(row)
            pair = [c.proxy_id, c.site]
            self._q_put = ins.on_conflict_do_update(
                index_elements=pair,
                set_={
                    "until": ins.excluded.until,
                    "kind": ins.excluded.kind,
                    "strikes": ins.excluded.strikes,
                    "keep_until": ins.excluded.keep_until,
                },
            )
            # RETURNING says which way it went: a row when inserted or updated, none when
            # the WHERE kept the hold in force (SQLAlchemy promises rowcount only for
            # UPDATE and DELETE).
            self._q_claim = ins.on_conflict_do_update(
                index_elements=pair,
                set_={"until": ins.excluded.until, "kind": ins.excluded.kind, "keep_until": keep},
                where=c.until <= _bp("b_now"),
            ).returning(c.kind)

    def __repr__(self) -> str:
        return f"SqlSiteStore({self._storage._where})"

    # ------------------------------------------------------------------ plumbing

    def _failure(self, exc: DBAPIError) -> BaseException:
        storage = self._storage
        if _NO_TABLE.search(str(exc.orig)):
            if site_holds.name not in str(exc.orig) or not self._has_proxies():
                return storage._no_schema()
            where = storage._where
            return _storage_error(
                f"the pharox-integrations schema in {where} predates per-site holds: upgrade it with "
                "`pharox-integrations db init --storage URL` (or SqlStorage(url, create_schema=True))",
                where=where,
                kind="no_schema",
                reason="the schema predates per-site holds (table pxi_site_holds missing)",
            )
        if isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated:
            return storage._unavailable(exc)
        return exc

    def _has_proxies(self) -> bool:
        """Whether the rest of the schema is there (only asked once the holds table is
        found missing), so an empty database is not told to "upgrade"."""
        try:
            return sa.inspect(self._storage.engine).has_table(proxies.name)
        except DBAPIError:  # cannot tell: the upgrade advice is right for both cases
            return True

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction: PostgreSQL's single statements autocommit; SQLite takes
        the storage's writer lock and ``BEGIN IMMEDIATE`` (see `SqlStorage._tx`)."""
        if self._pg:
            with self._storage._autocommit() as conn:
                yield conn
        else:
            with self._storage._tx() as conn:
                yield conn

    def _reading(self) -> Any:
        return self._storage._autocommit() if self._pg else self._storage._read()

    # ------------------------------------------------------------------ SiteStore

    @_guarded
    def holds(self, site: str, now: float) -> dict[UUID, Hold]:
        """The site's holds in force at `now`: one range of the (site, until) index."""
        with self._reading() as conn:
            rows = conn.execute(self._q_holds, {"b_site": _key(site), "b_now": now}).all()
        return {row.proxy_id: _hold(row) for row in rows}

    @_guarded
    def get(self, proxy_id: UUID, site: str) -> Hold | None:
        """The pair's hold, also one that is over but not yet purged (its strikes count)."""
        with self._reading() as conn:
            row = conn.execute(self._q_get, {"b_pid": proxy_id, "b_site": _key(site)}).first()
        return None if row is None else _hold(row)

    @_guarded
    def put(self, proxy_id: UUID, site: str, hold: Hold) -> None:
        """Insert or replace the pair's hold (nothing for a proxy the storage lacks)."""
        params = {
            "b_pid": proxy_id,
            "b_site": _key(site),
            "b_until": hold.until,
            "b_kind": hold.kind,
            "b_strikes": hold.strikes,
            "b_keep": hold.keep_until,
        }
        with self._write() as conn, contextlib.suppress(IntegrityError):
            # Only the foreign key can fail (the pair's key is upserted): the proxy was
            # deleted, and its holds would have gone with it.
            conn.execute(self._q_put, params)

    @_guarded
    def claim(self, proxy_id: UUID, site: str, until: float, now: float) -> bool:
        """Hold the pair as DELAY until `until` unless a hold is in force at `now`; True
        when this call got it.  Atomic across processes (see the module docstring)."""
        params = {
            "b_pid": proxy_id,
            "b_site": _key(site),
            "b_until": until,
            "b_kind": DELAY,
            "b_strikes": 0,
            "b_keep": until,
            "b_now": now,
        }
        with self._write() as conn:
            try:
                if not self._mysql:
                    return conn.execute(self._q_claim, params).first() is not None
                # FOUND_ROWS: a matched row counts even if no value changed (delay 0).
                if conn.execute(self._q_claim_update, params).rowcount == 1:
                    return True
                conn.execute(self._q_claim_insert, params)
                return True
            except IntegrityError:
                # MariaDB: a concurrent claimer inserted the pair first (duplicate key);
                # anywhere: the proxy is not (or no longer) in the storage.
                return False

    @_guarded
    def bans(self, proxy_id: UUID, now: float) -> int:
        """Sites with a ban in force on the proxy (a prefix of the primary key)."""
        with self._reading() as conn:
            return int(conn.execute(self._q_bans, {"b_pid": proxy_id, "b_now": now}).scalar_one())

    @_guarded
    def in_force(self, now: float, site: str | None = None) -> list[tuple[UUID, str, Hold]]:
        """Every hold in force, by site then end (for reports, not the request path)."""
        with self._reading() as conn:
            if site is None:
                rows = conn.execute(self._q_in_force, {"b_now": now}).all()
            else:
                rows = conn.execute(self._q_in_force_site, {"b_now": now, "b_site": _key(site)}).all()
        return [(row.proxy_id, row.site, _hold(row)) for row in rows]

    @_guarded
    def purge(self, now: float) -> int:
        """Forget the pairs whose `keep_until` has passed (the keep_until index)."""
        with self._write() as conn:
            return int(conn.execute(self._q_purge, {"b_now": now}).rowcount)
