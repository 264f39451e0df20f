"""Every code block of the documentation runs, against real local servers.

Python blocks use fixed, readable addresses; the test starts real servers and points
the blocks at them before running each one in its own interpreter:

    127.0.0.1:3128  proxy.py with credentials user:pass
    127.0.0.1:3129  proxy.py without credentials
    127.0.0.1:3130  proxy.py that the site bans (403)
    127.0.0.1:1080  pproxy SOCKS5
    127.0.0.1:3999  a port that refuses connections
    127.0.0.1:8000  the demo shop site (/, /page/<i>, /api/items?page=<i>)

A block preceded by `<!-- not-run: reason -->` is skipped (keep those few).  Shell
blocks are not run, but every `pharox-integrations ...` line in them must parse.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import ProxyKit
from sqlhelpers import private_database

from pharox_integrations.cli import build_parser
from pharox_integrations.demo.site import DemoSite
from pharox_integrations.settings import SETTINGS_DOC

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.S | re.M)
_ADDRESS = re.compile(r"127\.0\.0\.1:(3128|3129|3130|1080|3999|8000)\b")
_NOT_RUN = "<!-- not-run:"
_MAX_NOT_RUN = 3
_SECRET = "user:pass"
_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Block:
    page: str
    number: int
    lang: str
    code: str
    skipped: bool

    @property
    def id(self) -> str:
        return f"{self.page}#{self.number}"


def _blocks() -> list[Block]:
    found: list[Block] = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for number, match in enumerate(_FENCE.finditer(text), start=1):
            before = text[: match.start()].rstrip().splitlines()[-1:] or [""]
            found.append(
                Block(
                    page=str(path.relative_to(DOCS)),
                    number=number,
                    lang=match.group("lang"),
                    code=match.group("body"),
                    skipped=before[0].strip().startswith(_NOT_RUN),
                )
            )
    return found


BLOCKS = _blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in ("bash", "sh", "console", "shell")]


@pytest.fixture(scope="module")
def docs_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    kit = ProxyKit(tmp_path_factory.mktemp("docs-kit"))
    try:
        auth, plain, banned = kit.many("http", [("user", "pass"), None, None])
        socks = kit.socks5()
        dead = kit.dead()
        with DemoSite(pages=24, banned_ips={banned.outbound_ip}) as site:
            yield {
                "3128": str(auth.port),
                "3129": str(plain.port),
                "3130": str(banned.port),
                "1080": str(socks.port),
                "3999": str(dead.port),
                "8000": site.url.rsplit(":", 1)[1],
            }
    finally:
        kit.close()


def test_docs_have_blocks_and_few_unrun() -> None:
    assert len(PYTHON) >= 15, [b.id for b in PYTHON]
    skipped = [b.id for b in PYTHON if b.skipped]
    assert len(skipped) <= _MAX_NOT_RUN, skipped


@pytest.mark.parametrize("block", [b for b in PYTHON if not b.skipped], ids=lambda b: b.id)
def test_python_block_runs(block: Block, docs_servers: dict[str, str], tmp_path: Path) -> None:
    if _PG_URL in block.code:
        # The block's database URL, pointed at a throw-away schema of the test server.
        with private_database("postgres", tmp_path) as url:
            _run_block(block, block.code.replace(_PG_URL, url), docs_servers, tmp_path)
    else:
        _run_block(block, block.code, docs_servers, tmp_path)


def _run_block(block: Block, code: str, docs_servers: dict[str, str], tmp_path: Path) -> None:
    code = _ADDRESS.sub(lambda m: f"127.0.0.1:{docs_servers[m.group(1)]}", code)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("PHAROX_")}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    script = tmp_path / "block.py"  # a file, not -c: Scrapy reads callbacks' source
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block.id} failed:\n{output[-3000:]}"
    assert _SECRET not in output, f"{block.id} printed proxy credentials:\n{output}"


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.id)
def test_shell_commands_parse(block: Block) -> None:
    parser = build_parser()
    for line in block.code.splitlines():
        line = line.split("#", 1)[0].strip().removeprefix("$ ")
        if not line.startswith("pharox-integrations "):
            continue
        argv = shlex.split(line.replace("$PHAROX_STORAGE_URL", "sqlite:///x.db"))[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse exits on a bad command line
            pytest.fail(f"{block.id}: {line!r} does not parse (exit {exc.code})")


def _hooks() -> object:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_table_lists_every_key() -> None:
    hooks = _hooks()
    table: str = hooks.settings_table()  # type: ignore[attr-defined]
    for key in SETTINGS_DOC:
        assert f"| `{key}` |" in table
    assert table.count("\n") == len(SETTINGS_DOC) + 1  # header, rule, one row per key
    assert "<!-- settings-table -->" in (DOCS / "settings.md").read_text(encoding="utf-8")


def test_settings_table_fails_for_an_undocumented_key(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = _hooks()
    monkeypatch.setitem(SETTINGS_DOC, "PHAROX_SOMETHING_NEW", "a new setting")
    with pytest.raises(KeyError, match="PHAROX_SOMETHING_NEW"):
        hooks.settings_table()  # type: ignore[attr-defined]


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "dev" not in p.relative_to(DOCS).parts]
    missing = [p for p in pages if p not in nav]
    assert not missing, f"pages missing from mkdocs.yml nav: {missing}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (the [docs] extra)")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    settings_page = (tmp_path / "site" / "settings" / "index.html").read_text(encoding="utf-8")
    for key in SETTINGS_DOC:
        assert key in settings_page
