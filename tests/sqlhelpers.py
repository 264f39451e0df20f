"""Shared helpers for tests that need the real SQL servers.

A server that cannot be reached skips the test with a reason saying how to enable it,
except under ``CI=true`` where a skipped database would hide a failure, so it fails.
Each test run works in its own PostgreSQL schema / MariaDB database, because other
people use the same servers at the same time.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_URL = os.environ.get(
    "PHAROX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("PHAROX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
BACKENDS = ("sqlite", "postgres", "mysql")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI (where every database must really run)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: database tests must not be skipped)")
    pytest.skip(reason)


def _check(url: str, env: str) -> None:
    engine = sa.create_engine(url, pool_pre_ping=False, connect_args=_timeout(url))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        unavailable(
            f"{sa.make_url(url).render_as_string(hide_password=True)} unreachable "
            f"({type(exc).__name__}); start the server or set {env}"
        )
    finally:
        engine.dispose()


def _timeout(url: str) -> dict[str, int]:
    return {"connect_timeout": 3}


def with_search_path(url: str, schema: str) -> str:
    """A PostgreSQL URL whose connections work in `schema`."""
    u = sa.make_url(url)
    return u.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


@contextmanager
def private_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty, throw-away database of `backend`; removed afterwards."""
    name = f"pxi_t_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (name + '.db')}"
        return
    if backend == "postgres":
        _check(POSTGRES_URL, "PHAROX_TEST_POSTGRES_URL")
        admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        try:
            yield with_search_path(POSTGRES_URL, name)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
            admin.dispose()
        return
    if backend == "mysql":
        _check(MYSQL_URL, "PHAROX_TEST_MYSQL_URL")
        admin = sa.create_engine(MYSQL_URL)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
        try:
            yield sa.make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            admin.dispose()
        return
    raise ValueError(backend)


def backend_params() -> list[object]:
    """pytest params for the three databases, marked so `-m postgres` etc. select them."""
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
    ]


def postgres_binaries() -> Path | None:
    """Directory holding initdb/pg_ctl of the installed PostgreSQL, if any."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None
