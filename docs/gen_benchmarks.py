"""Fill docs/benchmarks.md with the output of the benchmark scripts, and a chart.

    python docs/gen_benchmarks.py            # full runs (several minutes each)
    python docs/gen_benchmarks.py --quick    # the scripts' --quick mode
    python docs/gen_benchmarks.py --only bench_core.py
    python docs/gen_benchmarks.py --saved DIR    # paste outputs recorded earlier (DIR/<script>.txt)

Each script's output goes between `<!-- begin: NAME -->` and `<!-- end: NAME -->`;
scripts listed in `CHARTS` also get a Mermaid line chart of their first table between
`<!-- begin: chart NAME -->` and `<!-- end: chart NAME -->`.
Scripts without markers in the page are skipped.  Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ChartSpec:
    """Which table of a script's output to draw: its first `x_cols` columns label the
    x axis, `series` are the columns drawn as lines (0-based, as printed)."""

    x_cols: int
    series: tuple[int, ...]
    unit: str


#: Scripts whose first table is worth a chart (the others get their tables only).
CHARTS = {
    "bench_core.py": ChartSpec(x_cols=1, series=(1, 2), unit="µs per request (lower is better)"),
    "bench_urllib3.py": ChartSpec(x_cols=2, series=(2, 3, 4), unit="requests/s (higher is better)"),
}


def _cells(line: str) -> list[str]:
    if "|" in line:
        return [c.strip() for c in line.strip().strip("|").split("|")]
    return line.split()


def chart(output: str, spec: ChartSpec, title: str) -> str | None:
    """A Mermaid xychart of the first table in `output` whose rows start with a number."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        head = _cells(line)
        if len(head) <= max(spec.series) or not head[0] or head[0][0].isdigit():
            continue
        rows: list[list[str]] = []
        for row in lines[i + 1 :]:
            if set(row.strip()) <= set("-+|: "):  # a rule under the header
                if rows:
                    break
                continue
            cells = _cells(row)
            if len(cells) < len(head) or not cells[0][:1].isdigit():
                break
            rows.append(cells)
        if len(rows) < 2:
            continue
        series = [(head[c], [_value(r[c]) for r in rows]) for c in spec.series]
        if any(v is None for _, values in series for v in values):
            continue
        top = max(v for _, values in series for v in values if v is not None)
        labels = [" / ".join(r[: spec.x_cols]) for r in rows]
        out = ["```mermaid", "xychart-beta", f'    title "{title}"']
        out.append("    x-axis [" + ", ".join(f'"{label}"' for label in labels) + "]")
        out.append(f'    y-axis "{spec.unit}" 0 --> {top * 1.1:.0f}')
        out += [f"    line [{', '.join(f'{v:g}' for v in values if v is not None)}]" for _, values in series]
        out.append("```")
        axis = " / ".join(head[: spec.x_cols])
        legend = ", ".join(f"line {n + 1}: {name}" for n, (name, _) in enumerate(series))
        return "\n".join(out) + f"\n\nx axis: {axis}; {legend}."
    return None


def render(command: str, where: str, output: str) -> str:
    """Markdown tables stay tables (headings demoted under the page's); the rest is text."""
    if any(line.startswith("|---") for line in output.splitlines()):
        body = re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + 3) + " ", output, flags=re.M)
        return f"`$ {command}` ({where})\n\n{body}"
    return f"```text\n$ {command}    # {where}\n{output}\n```"


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
    parser.add_argument(
        "--saved",
        type=Path,
        default=None,
        help="folder of outputs recorded earlier (<script>.txt, full runs): use them instead of running",
    )
    args = parser.parse_args()
    page = PAGE.read_text(encoding="utf-8")
    scripts = args.only or sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for script in scripts:
        if f"<!-- begin: {script} -->" not in page:
            print(f"skip {script}: no markers in {PAGE.name}")
            continue
        saved = args.saved / f"{script}.txt" if args.saved else None
        if saved is not None and saved.exists():
            output = saved.read_text(encoding="utf-8").rstrip()
            command = f"python benchmarks/{script}"
        else:
            print(f"running {script} ...", flush=True)
            output = run(script, args.quick)
            command = f"python benchmarks/{script}{' --quick' if args.quick else ''}"
        where = f"{stamp}, Python {platform.python_version()}, {platform.machine()}"
        page = replace(page, script, render(command, where, output))
        spec = CHARTS.get(script)
        drawn = chart(output, spec, script) if spec else None
        if drawn:
            page = replace(page, f"chart {script}", drawn)
    PAGE.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
