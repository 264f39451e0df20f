"""The built wheel and sdist install into a fresh venv and work there.

`python -m build` makes the sdist and then the wheel from that sdist (so the sdist is
known to be complete).  Each artifact goes into its own new venv with its `[sql]`
extra, dependencies from the package index, and is then used from outside the
checkout: the CLI entry point, `py.typed`, every migration file, and `db init`, which
runs the Alembic migrations shipped in the installed package.

Cost: the build takes ~3 s; each venv and install ~10 s with a warm pip cache (about
30 s in all), more on a cold cache or a slow index.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "pharox_integrations" / "storage" / "migrations"

# Run by the installed interpreter: what importlib.resources finds inside the package.
_CHECK = """
import json, importlib.resources as r
import pharox_integrations

def walk(node, prefix=""):
    for child in node.iterdir():
        if child.name == "__pycache__":
            continue
        if child.is_dir():
            yield from walk(child, prefix + child.name + "/")
        else:
            yield prefix + child.name

root = r.files("pharox_integrations")
print(json.dumps({
    "file": pharox_integrations.__file__,
    "py_typed": (root / "py.typed").is_file(),
    "migrations": sorted(walk(root / "storage" / "migrations")),
}))
"""


def _env() -> dict[str, str]:
    """The caller's environment without anything that would import the checkout."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.upper().startswith("PHAROX_")}


def _run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def _source_migrations() -> list[str]:
    return sorted(
        str(p.relative_to(MIGRATIONS))
        for p in MIGRATIONS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def _head_revision() -> str:
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        text = script.read_text(encoding="utf-8")
        revisions.update(re.findall(r'^revision = "([^"]+)"', text, re.M))
        parents.update(re.findall(r'^down_revision = "([^"]+)"', text, re.M))
    (head,) = revisions - parents
    return head


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_the_artifact_installs_into_a_fresh_venv_and_works(
    kind: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python, cli = str(bin_dir / "python"), str(bin_dir / "pharox-integrations")
    _run([python, "-m", "pip", "install", "-q", f"{artifacts[kind]}[sql]"], cwd=tmp_path)

    assert "db" in _run([cli, "--help"], cwd=tmp_path).stdout

    found = json.loads(_run([python, "-c", _CHECK], cwd=tmp_path).stdout)
    assert Path(found["file"]).is_relative_to(venv), found["file"]  # the installed copy, not the checkout
    assert found["py_typed"]
    assert found["migrations"] == _source_migrations()
    assert "script.py.mako" in found["migrations"]

    db = tmp_path / "x.db"
    _run([cli, "db", "init", "--storage", f"sqlite:///{db}"], cwd=tmp_path)
    with sqlite3.connect(db) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = conn.execute("SELECT version_num FROM pxi_alembic_version").fetchall()
    assert versions == [(_head_revision(),)]
    assert len(tables - {"pxi_alembic_version"}) >= 3, tables
