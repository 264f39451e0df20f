"""Storage URLs: typos are one `ConfigurationError` line, a database that cannot be used
says why (missing database, refused login, unreachable), and no message ever holds a
fragment of the password.  Real PostgreSQL and MariaDB (see sqlhelpers)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlhelpers import MYSQL_URL, POSTGRES_URL, unavailable

from pharox_integrations import LeaseBroker
from pharox_integrations.errors import ConfigurationError, StorageUnavailable, UnknownStorage
from pharox_integrations.storage import ACCEPTED, safe_storage_url, storage_from_url
from pharox_integrations.storage.sql import SqlStorage, init_schema

PASSWORD = "s3cr3t-Pw"


def assert_no_secret(text: str, secret: str = PASSWORD) -> None:
    """Neither the secret nor any piece of it 4 characters or longer."""
    pieces = {secret[i:j] for i in range(len(secret)) for j in range(i + 4, len(secret) + 1)}
    leaked = sorted(p for p in pieces if p in text)
    assert not leaked, f"{leaked} of the password in: {text}"


def assert_one_line(text: str) -> None:
    assert text and "\n" not in text, text


@pytest.mark.parametrize(
    ("url", "kind", "expected"),
    [
        (
            "sqlite://pool.db",
            UnknownStorage,
            "storage URL 'sqlite://pool.db' is not a SQLite file URL: write sqlite:///pool.db",
        ),
        (
            "sqlite:pool.db",
            UnknownStorage,
            "storage URL 'sqlite:pool.db' is not a SQLite file URL: write sqlite:///pool.db",
        ),
        ("pool.db", UnknownStorage, "storage URL 'pool.db' has no scheme: for a SQLite file write sqlite:///pool.db"),
        ("sqlite://", ConfigurationError, "is an in-memory SQLite database, private to one connection: use memory://"),
        ("sqlite:///:memory:", ConfigurationError, "in-memory SQLite database"),
        (
            f"postgres://postgres:{PASSWORD}@127.0.0.1/test",
            UnknownStorage,
            "storage URL 'postgres://postgres:***@127.0.0.1/test': postgres:// is not supported, "
            "write postgresql+psycopg://postgres:***@127.0.0.1/test (accepted: " + ACCEPTED + ")",
        ),
        (
            f"postgresql://postgres:{PASSWORD}@127.0.0.1/test",
            UnknownStorage,
            "postgresql:// is not supported, write postgresql+psycopg://postgres:***@127.0.0.1/test",
        ),
        (
            f"mysql://root:{PASSWORD}@127.0.0.1/test",
            UnknownStorage,
            "storage URL 'mysql://root:***@127.0.0.1/test': mysql:// is not supported, "
            "write mysql+pymysql://root:***@127.0.0.1/test (accepted: " + ACCEPTED + ")",
        ),
        (f"mysql+mysqldb://root:{PASSWORD}@h/test", UnknownStorage, "write mysql+pymysql://root:***@h/test"),
        (
            f"postgresql+psycopg://u:{PASSWORD[:3]}@{PASSWORD[3:]}@127.0.0.1/test",
            ConfigurationError,
            "storage URL 'postgresql+psycopg://u:***@127.0.0.1/test' has an '@' in its user name or password: "
            "write it as %40",
        ),
        (f"postgresql+psycopg://u:{PASSWORD}@h:99999/db", ConfigurationError, "has port 99999; expected 1-65535"),
        ("postgresql+psycopg://h:port/db", ConfigurationError, "cannot be parsed: expected scheme://user:password@"),
        (f"redis://u:{PASSWORD}@h/0", UnknownStorage, "unknown storage URL 'redis://u:***@h/0'; supported: memory://"),
        (f"root:{PASSWORD}@127.0.0.1/test", UnknownStorage, "unknown storage URL 'root:***@127.0.0.1/test'"),
    ],
)
def test_storage_url_typos_are_one_line_naming_url_and_forms(url: str, kind: type[Exception], expected: str) -> None:
    with pytest.raises(kind) as caught:
        storage_from_url(url)
    message = str(caught.value)
    assert expected in message
    assert_one_line(message)
    assert_no_secret(message)
    # The same words reach a broker built from settings.
    with pytest.raises(kind) as from_settings:
        LeaseBroker.from_settings({"PHAROX_STORAGE_URL": url, "PHAROX_PROXIES": ["http://127.0.0.1:1"]})
    assert expected in str(from_settings.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql+psycopg://u:{PASSWORD}@h/db", "postgresql+psycopg://u:***@h/db"),
        ("postgresql+psycopg://u:a@b:c/d@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        (
            f"postgresql+psycopg://h/db?sslmode=require&password={PASSWORD}",
            "postgresql+psycopg://h/db?sslmode=require&password=***",
        ),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        (f"u:{PASSWORD}@h/db", "u:***@h/db"),
    ],
)
def test_safe_storage_url_masks_the_whole_password(url: str, shown: str) -> None:
    assert safe_storage_url(url) == shown


# ---------------------------------------------------------------------------- real servers


def server(url: str, env: str) -> sa.URL:
    """The test server's URL; skip (fail under CI=true) when it does not answer."""
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        unavailable(
            f"{sa.make_url(url).render_as_string(hide_password=True)} unreachable ({type(exc).__name__}); set {env}"
        )
    finally:
        engine.dispose()
    return sa.make_url(url)


def missing(kind: str) -> str:
    return f"pxi_no_{kind}_{uuid.uuid4().hex[:8]}"


def bad_urls() -> list[object]:
    """(server, URL maker, what is wrong, expected words) for a server that refuses us."""
    pg = pytest.mark.postgres
    my = pytest.mark.mysql
    return [
        pytest.param(
            (POSTGRES_URL, "PHAROX_TEST_POSTGRES_URL"),
            lambda u, name: u.set(database=name, password=PASSWORD),
            "database",
            "the server has no database '{name}'",
            id="postgres-no-database",
            marks=pg,
        ),
        pytest.param(
            (POSTGRES_URL, "PHAROX_TEST_POSTGRES_URL"),
            lambda u, name: u.set(username=name, password=PASSWORD),
            "role",
            "the server refused user '{name}' (role \"{name}\" does not exist)",
            id="postgres-no-role",
            marks=pg,
        ),
        pytest.param(
            (MYSQL_URL, "PHAROX_TEST_MYSQL_URL"),
            lambda u, name: u.set(database=name),
            "database",
            "the server has no database '{name}'",
            id="mysql-no-database",
            marks=my,
        ),
        pytest.param(
            (MYSQL_URL, "PHAROX_TEST_MYSQL_URL"),
            lambda u, name: u.set(username=name, password=PASSWORD),
            "role",
            "the server refused user '{name}' (Access denied for user '{name}'",
            id="mysql-no-user",
            marks=my,
        ),
        pytest.param(
            (MYSQL_URL, "PHAROX_TEST_MYSQL_URL"),
            lambda u, name: u.set(password=PASSWORD),
            "password",
            "the server refused user '{user}' (Access denied for user '{user}'",
            id="mysql-wrong-password",
            marks=my,
        ),
    ]


@pytest.mark.parametrize(("base", "make", "wrong", "expected"), bad_urls())
def test_a_server_that_refuses_us_says_why_never_the_schema(
    base: tuple[str, str], make: object, wrong: str, expected: str
) -> None:
    good = server(*base)
    name = missing(wrong)
    url = make(good, name).render_as_string(hide_password=False)  # type: ignore[operator]
    words = expected.format(name=name, user=good.username)
    for attempt in (lambda: storage_from_url(url).list_pools(), lambda: init_schema(url)):
        with pytest.raises(StorageUnavailable) as caught:
            attempt()
        message = str(caught.value)
        assert words in message
        assert "schema" not in message and "resumes" not in message  # waiting will not fix this
        assert caught.value.kind in ("no_database", "login")  # type: ignore[attr-defined]
        assert_one_line(message)
        assert_no_secret(message)


def test_an_unreachable_database_is_transient(tmp_path: Path) -> None:
    import socket

    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        storage = SqlStorage(f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{port}/test")
        try:
            with pytest.raises(StorageUnavailable) as caught:
                storage.list_pools()
        finally:
            storage.close()
    message = str(caught.value)
    assert f"postgresql at 127.0.0.1:{port}/test" in message and "Connection refused" in message
    assert "leasing resumes by itself" in message  # long-running leasing: it does
    assert caught.value.transient  # type: ignore[attr-defined]
    assert_one_line(message)
    assert_no_secret(message)


def test_a_sqlite_file_that_cannot_be_opened(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'pool.db'}"
    with pytest.raises(StorageUnavailable, match=r"cannot open the file \(unable to open database file\)"):
        init_schema(url)
