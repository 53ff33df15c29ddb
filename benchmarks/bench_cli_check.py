"""The readiness probe: wall time of one ``alembic-autolock check`` at head, per call, beside
what it cannot beat and what plain Alembic takes for the same question.

    .venv/bin/python benchmarks/bench_cli_check.py [--sizes 5,500] [--runs 21] [--quick]

Each figure is the wall time of a fresh process, as a Kubernetes exec probe starts one, with the
installed byte-code (``PYTHONDONTWRITEBYTECODE=1``: revision files are never byte-compiled), the
commands interleaved so that load drift hits them alike:

* **python**: ``python -c pass``: starting the interpreter;
* **floor**: ``python -c`` importing psycopg2, connecting and one ``SELECT version_num``: the
  target is "little more than this";
* **check**: ``alembic-autolock check`` (the manifest is there: the fast path);
* **check, no manifest**: the same with ``ALEMBIC_AUTOLOCK_CACHE_DIR=off`` (what it cost
  before the fast path: SQLAlchemy, Alembic and every revision file);
* **alembic current**: plain Alembic's own answer.

Prints the medians and p95s, and the ratios against the floor and plain Alembic; ``--json``
writes them.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

from bench_cold_start import PG, REPO, history, stats, wall

FLOOR = (
    "import sys, psycopg2\n"
    "conn = psycopg2.connect(sys.argv[1], connect_timeout=5)\n"
    "cur = conn.cursor()\n"
    "cur.execute('SELECT version_num FROM alembic_version')\n"
    "cur.fetchall()\n"
    "conn.close()\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,500")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="5 revisions, 5 runs")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    sizes = [5] if args.quick else [int(s) for s in args.sizes.split(",")]
    runs = 5 if args.quick else args.runs

    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    compileall.compile_dir(str(REPO / "alembic_autolock"), quiet=1)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    env.pop("ALEMBIC_AUTOLOCK_CACHE_DIR", None)
    bin_dir = Path(sys.executable).parent
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    rows = []
    with tempfile.TemporaryDirectory(prefix="autolock-probe-") as tmp:
        env["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        for count in sizes:
            name = f"autolock_bench_probe_{uuid.uuid4().hex[:8]}"
            url = f"{PG}/{name}"
            dsn = url.replace("postgresql+psycopg2://", "postgresql://")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                ini = history(Path(tmp) / f"h{count}", count, url)
                cli = str(bin_dir / "alembic-autolock")
                wall([cli, "-c", ini, "upgrade"], env)  # at head; writes the manifest
                commands = {
                    "python": [sys.executable, "-c", "pass"],
                    "floor": [sys.executable, "-c", FLOOR, dsn],
                    "check": [cli, "-c", ini, "check"],
                    "check, no manifest": [cli, "-c", ini, "check"],
                    "alembic current": [str(bin_dir / "alembic"), "-c", ini, "current"],
                }
                times: dict[str, list[float]] = {label: [] for label in commands}
                for _ in range(runs):
                    for label, argv in commands.items():
                        run_env = env
                        if label == "check, no manifest":
                            run_env = dict(env, ALEMBIC_AUTOLOCK_CACHE_DIR="off")
                        times[label].append(wall(argv, run_env))
                floor = statistics.median(times["floor"])
                plain = statistics.median(times["alembic current"])
                for label, values in times.items():
                    median, p95 = stats(values)
                    rows.append(
                        {
                            "revisions": count,
                            "what": label,
                            "median_ms": round(median, 1),
                            "p95_ms": round(p95, 1),
                            "vs_floor": round(median / floor, 2),
                            "vs_alembic_current": round(median / plain, 2),
                        }
                    )
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    load = os.getloadavg()
    print(f"readiness probe, wall time per fresh process, {runs} runs each; load {load[0]:.1f}")
    print(f"{'revs':>5}  {'command':22} {'median':>9} {'p95':>9} {'x floor':>8} {'x alembic':>10}")
    for r in rows:
        print(
            f"{r['revisions']:>5}  {r['what']:22} {r['median_ms']:>7.1f}ms {r['p95_ms']:>7.1f}ms"
            f" {r['vs_floor']:>8.2f} {r['vs_alembic_current']:>10.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
