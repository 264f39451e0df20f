"""Every bad input to the command line: one line on stderr starting with
`pharox-integrations: error:`, nothing on stdout, the exit code docs/cli.md promises,
and never a fragment of a password.  Databases are the real PostgreSQL and MariaDB."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlhelpers import MYSQL_URL, POSTGRES_URL
from test_storage_url import PASSWORD, assert_no_secret, server

from pharox_integrations.cli import EXIT_STORAGE, EXIT_USAGE, build_parser, main
from pharox_integrations.storage import ACCEPTED
from pharox_integrations.storage.sql import init_schema

PREFIX = "pharox-integrations: error: "


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) as the shell sees it: argparse's exit is an exit code too."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result: tuple[int, str, str], code: int, *words: str) -> str:
    got, out, err = result
    assert got == code, err
    assert out == ""
    assert err.startswith(PREFIX) and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert "Traceback" not in err and "resumes" not in err
    assert_no_secret(err)
    return err


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    init_schema(url)
    return url


# ---------------------------------------------------------------------------- storage URLs


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sqlite://pool.db", ["storage URL 'sqlite://pool.db' is not a SQLite file URL: write sqlite:///pool.db"]),
        ("sqlite:pool.db", ["storage URL 'sqlite:pool.db' is not a SQLite file URL: write sqlite:///pool.db"]),
        ("sqlite://", ["in-memory SQLite database", "memory://"]),
        (
            f"postgres://postgres:{PASSWORD}@127.0.0.1/test",
            ["'postgres://postgres:***@127.0.0.1/test'", "write postgresql+psycopg://postgres:***@", ACCEPTED],
        ),
        (f"mysql://root:{PASSWORD}@127.0.0.1/test", ["'mysql://root:***@127.0.0.1/test'", "write mysql+pymysql://"]),
        (f"postgresql+psycopg://u:{PASSWORD[:4]}@{PASSWORD[4:]}@127.0.0.1/test", ["has an '@' in its user name"]),
        (f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:99999/test", ["has port 99999; expected 1-65535"]),
        (f"redis://u:{PASSWORD}@h/0", ["unknown storage URL 'redis://u:***@h/0'; supported: " + ACCEPTED]),
        ("memory://", ["lives inside one process"]),
    ],
)
@pytest.mark.parametrize("command", [["db", "init"], ["pool", "list"], ["pool", "stats", "--pool", "p"]])
def test_storage_url_typos_exit_2(
    capsys: pytest.CaptureFixture[str], command: list[str], url: str, words: list[str]
) -> None:
    assert_error(run(capsys, *command, "--storage", url), EXIT_USAGE, *words)


def test_a_bad_url_from_the_environment_says_where_it_came_from(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHAROX_STORAGE_URL", f"postgres://u:{PASSWORD}@h/db")
    assert_error(run(capsys, "pool", "list"), EXIT_USAGE, "PHAROX_STORAGE_URL: storage URL 'postgres://u:***@h/db'")


def test_no_traceback_from_the_installed_command() -> None:
    for url in ("sqlite:pool.db", f"postgres://postgres:{PASSWORD}@127.0.0.1/test"):
        done = subprocess.run(
            [sys.executable, "-m", "pharox_integrations.cli", "db", "init", "--storage", url],
            capture_output=True,
            text=True,
            check=False,
        )
        assert_error((done.returncode, done.stdout, done.stderr), EXIT_USAGE, "storage URL")


# ---------------------------------------------------------------------------- databases that refuse us


def refused() -> list[object]:
    pg, my = pytest.mark.postgres, pytest.mark.mysql
    pg_env, my_env = (POSTGRES_URL, "PHAROX_TEST_POSTGRES_URL"), (MYSQL_URL, "PHAROX_TEST_MYSQL_URL")
    return [
        pytest.param(pg_env, "database", "the server has no database '{name}'", id="postgres-no-database", marks=pg),
        pytest.param(
            pg_env, "username", "refused user '{name}' (role \"{name}\" does not exist)", id="pg-role", marks=pg
        ),
        pytest.param(my_env, "database", "the server has no database '{name}'", id="mysql-no-database", marks=my),
        pytest.param(
            my_env, "username", "refused user '{name}' (Access denied for user '{name}'", id="my-user", marks=my
        ),
        pytest.param(
            my_env, "password", "refused user '{user}' (Access denied for user '{user}'", id="my-pw", marks=my
        ),
    ]


@pytest.mark.parametrize(("base", "part", "words"), refused())
@pytest.mark.parametrize("command", [["db", "init"], ["pool", "list"], ["pool", "import", "-", "--pool", "p"]])
def test_a_missing_database_or_role_says_so_and_exit_3(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    base: tuple[str, str],
    part: str,
    words: str,
    command: list[str],
) -> None:
    good = server(*base)
    name = f"pxi_no_{part}_{uuid.uuid4().hex[:8]}"
    parts = {"password": PASSWORD} if part == "password" else {part: name}
    if part != "database" or good.drivername.startswith("postgresql"):  # MariaDB root has no password here
        parts.setdefault("password", PASSWORD)
    url = good.set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]
    monkeypatch.setattr("sys.stdin", _Stdin("http://127.0.0.1:3128\n"))
    shown = sa.make_url(url).render_as_string(hide_password=True)
    err = assert_error(
        run(capsys, *command, "--storage", url),
        EXIT_STORAGE,
        f"storage {shown} unavailable: ",
        words.format(name=name, user=good.username),
    )
    assert "schema" not in err and "db init" not in err


class _Stdin:
    def __init__(self, text: str) -> None:
        self.text = text

    def read(self) -> str:
        return self.text


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        yield closed.getsockname()[1]


@pytest.mark.parametrize(
    "command", [["db", "init"], ["pool", "list"], ["pool", "check", "--pool", "p", "--target", "http://x/"]]
)
def test_an_unreachable_database_exit_3_without_the_leasing_hint(
    capsys: pytest.CaptureFixture[str], closed_port: int, command: list[str]
) -> None:
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{closed_port}/test"
    assert_error(
        run(capsys, *command, "--storage", url),
        EXIT_STORAGE,
        f"storage postgresql+psycopg://postgres:***@127.0.0.1:{closed_port}/test unavailable: cannot connect",
        "Connection refused",
    )


def test_no_schema_and_an_unopenable_file_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert_error(
        run(capsys, "pool", "list", "--storage", empty),
        EXIT_STORAGE,
        "has no pharox schema: run pharox-integrations db init",
    )
    nowhere = f"sqlite:///{tmp_path / 'no' / 'dir' / 'pool.db'}"
    for command in (["db", "init"], ["pool", "list"]):
        assert_error(run(capsys, *command, "--storage", nowhere), EXIT_STORAGE, "cannot open the file")


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["pool", "check", "--pool", "p", "--target", "notaurl"],
            ["pool check: argument --target: 'notaurl' is not an http(s) URL"],
        ),
        (
            ["pool", "check", "--pool", "p", "--target", f"ftp://u:{PASSWORD}@h/"],
            ["argument --target: 'ftp://***@h/' is not an http(s) URL"],
        ),
        (["pool", "check", "--pool", "p", "--target", "http://h:99999/"], ["argument --target:"]),
        (
            ["pool", "check", "--pool", "p", "--target", "http://h/", "--timeout", "0"],
            ["argument --timeout: '0': expected a number of seconds > 0"],
        ),
        (["pool", "check", "--pool", "p", "--target", "http://h/", "--timeout", "nan"], ["argument --timeout:"]),
        (
            ["pool", "check", "--pool", "p", "--target", "http://h/", "--expect", "2OO"],
            ["argument --expect: '2OO': expected HTTP status codes"],
        ),
        (["pool", "check", "--pool", "p", "--target", "http://h/", "--expect", "99"], ["argument --expect:"]),
        (
            ["pool", "check", "--pool", "p", "--target", "http://h/", "--concurrency", "0"],
            ["argument --concurrency: '0': expected an integer > 0"],
        ),
        (
            ["pool", "check", "--pool", "p", "--target", "http://h/", "--slow-ms", "x"],
            ["argument --slow-ms: 'x' is not an integer"],
        ),
        (["pool", "check", "--pool", "p"], ["the following arguments are required: --target"]),
        (["pool", "list", "--limit", "-1"], ["argument --limit: '-1': expected a number of rows >= 0 (0 shows all)"]),
        (["pool", "list", "--pool", " "], ["argument --pool: ' ': expected a pool name"]),
        (["pool", "stats"], ["pool stats: the following arguments are required: --pool"]),
        (["pool", "import", "f.txt", "--pool", "p", "--format", "xml"], ["argument --format: invalid choice: 'xml'"]),
        (["pool", "import", "f.txt", "--pool", "p", "--max-concurrency", "-2"], ["argument --max-concurrency:"]),
        (["demo", "--site-port", "70000"], ["argument --site-port: '70000': expected a port 0-65535"]),
        (["demo", "--pages", "0"], ["argument --pages:"]),
        (["pool"], ["the following arguments are required: ACTION"]),
        (["nonsense"], ["invalid choice: 'nonsense'"]),
    ],
)
def test_option_errors_name_the_option_and_what_was_expected(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    assert_error(run(capsys, *argv), EXIT_USAGE, *words)


def test_every_option_has_help() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "pharox-integrations")
    assert not missing


def test_unknown_pool_and_unreadable_file_exit_2(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for verb in (
        ["list", "--pool", "nope"],
        ["stats", "--pool", "nope"],
        ["check", "--pool", "nope", "--target", "http://h/"],
    ):
        assert_error(run(capsys, "pool", *verb, "--storage", db), EXIT_USAGE, "pool 'nope' does not exist")
    assert_error(
        run(capsys, "pool", "import", str(tmp_path / "missing.txt"), "--storage", db, "--pool", "x"),
        EXIT_USAGE,
        "cannot read",
    )
    sheet = tmp_path / "bad.csv"
    sheet.write_text("host,port\n127.0.0.1,80\n")
    assert_error(
        run(capsys, "pool", "import", str(sheet), "--storage", db, "--pool", "x"),
        EXIT_USAGE,
        "has no 'url' or 'proxy' column",
    )


def test_no_storage_at_all_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHAROX_STORAGE_URL", raising=False)
    assert_error(run(capsys, "pool", "list"), EXIT_USAGE, "no storage: pass --storage URL or set PHAROX_STORAGE_URL")
