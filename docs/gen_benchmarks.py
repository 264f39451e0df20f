"""Fill docs/benchmarks.md with the output of the benchmark scripts, and a chart.

    python docs/gen_benchmarks.py            # full runs (several minutes each)
    python docs/gen_benchmarks.py --quick    # the scripts' --quick mode
    python docs/gen_benchmarks.py --only bench_core.py

Each script's output goes between `<!-- begin: NAME -->` and `<!-- end: NAME -->`;
the first table whose first column is a number (pool size, threads…) also becomes a
Mermaid line chart between `<!-- begin: chart NAME -->` and `<!-- end: chart NAME -->`.
Scripts without markers in the page are skipped.  Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def run(script: str, quick: bool) -> str:
    argv = [sys.executable, str(ROOT / "benchmarks" / script), *(["--quick"] if quick else [])]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout.rstrip()


def _value(cell: str) -> float | None:
    match = _NUMBER.search(cell)
    return float(match.group().replace(",", "")) if match else None


def chart(output: str, title: str) -> str | None:
    """A Mermaid xychart of the first `x | y1 | y2 ...` table in `output`, or None."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "|" not in line:
            continue
        head = [c.strip() for c in line.split("|")]
        rows = []
        for row in lines[i + 1 :]:
            if set(row.strip()) <= set("-+| "):
                if rows:
                    break
                continue
            if "|" not in row:
                break
            cells = [c.strip() for c in row.split("|")]
            if len(cells) != len(head) or _value(cells[0]) is None or not cells[0][0].isdigit():
                break
            rows.append(cells)
        if len(rows) < 2:
            continue
        series = []
        for col in range(1, len(head)):
            values = [_value(r[col]) for r in rows]
            if all(v is not None for v in values) and not head[col].lower().startswith("speed"):
                series.append((head[col], values))
        if not series:
            continue
        top = max(v for _, values in series for v in values if v is not None)
        out = ["```mermaid", "xychart-beta", f'    title "{title}"']
        out.append("    x-axis [" + ", ".join(f'"{r[0]}"' for r in rows) + "]")
        out.append(f'    y-axis "as in the table" 0 --> {top * 1.1:.0f}')
        out += [f"    line [{', '.join(f'{v:g}' for v in values)}]" for _, values in series]
        out.append("```")
        legend = ", ".join(f"line {n + 1}: {name}" for n, (name, _) in enumerate(series))
        return "\n".join(out) + f"\n\n{legend}."
    return None


def replace(page: str, name: str, body: str) -> str:
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    if begin not in page:
        return page
    head, _, rest = page.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, help="script names, e.g. bench_core.py")
    args = parser.parse_args()
    page = PAGE.read_text(encoding="utf-8")
    scripts = args.only or sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for script in scripts:
        if f"<!-- begin: {script} -->" not in page:
            print(f"skip {script}: no markers in {PAGE.name}")
            continue
        print(f"running {script} ...", flush=True)
        output = run(script, args.quick)
        command = f"python benchmarks/{script}{' --quick' if args.quick else ''}"
        where = f"{stamp}, Python {platform.python_version()}, {platform.machine()}"
        page = replace(page, script, f"```text\n$ {command}    # {where}\n{output}\n```")
        drawn = chart(output, script)
        if drawn:
            page = replace(page, f"chart {script}", drawn)
    PAGE.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
