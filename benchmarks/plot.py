"""Draw the curves of docs/performance.md from the benchmarks' JSON figures.

    .venv/bin/python benchmarks/bench_cold_start.py --json cold.json
    .venv/bin/python benchmarks/bench_stampede.py --json stampede.json
    .venv/bin/python benchmarks/plot.py --cold cold.json --stampede stampede.json --out docs/img

Writes ``cold_start.png`` (the first call at head against the history's size, ours beside plain
Alembic, beyond the floor every process pays) and ``stampede.png`` (time until every process
of a fleet is through, and the peak of database connections, against the fleet's size, per
backend). Needs matplotlib (``pip install 'alembic-autolock[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def cold_start(rows: list[dict[str, Any]], out: Path) -> Path:
    plt = _pyplot()
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row.get("beyond_floor_ms") is not None:
            series[row["what"]].append((row["revisions"], row["beyond_floor_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("revisions in the history")
    ax.set_ylabel("ms beyond import sqlalchemy + first connect")
    ax.set_title("First call of a fresh process, database at head")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "cold_start.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stampede(rows: list[dict[str, Any]], out: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_backend: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("phase") == "stampede":
            by_backend[row["backend"]].append(row)
    for backend, found in sorted(by_backend.items()):
        found.sort(key=lambda r: r["processes"])
        sizes = [r["processes"] for r in found]
        left.plot(sizes, [r["elapsed_s"] for r in found], marker="o", label=backend)
        right.plot(sizes, [r["peak_connections"] for r in found], marker="o", label=backend)
    left.set_title("Fleet through (exactly one migrator)")
    left.set_ylabel("seconds until the last process is through")
    right.set_title("Peak connections to the database")
    right.set_ylabel("connections")
    for ax in (left, right):
        ax.set_xlabel("processes started at once")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "stampede.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", help="bench_cold_start.py --json output")
    parser.add_argument("--stampede", help="bench_stampede.py --json output")
    parser.add_argument("--out", default="docs/img", help="directory for the PNG files")
    args = parser.parse_args()
    if not (args.cold or args.stampede):
        parser.error("give --cold and/or --stampede")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cold:
        print(cold_start(json.loads(Path(args.cold).read_text()), out))
    if args.stampede:
        print(stampede(json.loads(Path(args.stampede).read_text()), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
