"""The first call of a fresh process against a database already at head (a serverless cold
start, a new pod, a readiness probe), for histories of 50, 500 and 2000 revisions.

    .venv/bin/python benchmarks/bench_cold_start.py [--sizes 50,500,2000] [--runs 15] [--quick]

Every figure is measured in a fresh Python process with PYTHONDONTWRITEBYTECODE=1 (as in most
containers: the revision files are never byte-compiled), the library and its dependencies
byte-compiled once beforehand as pip does when it installs them. In each process:

* **floor**: ``import sqlalchemy`` and the driver, ``create_engine``, the first connection
  and one ``SELECT 1``: what any application pays anyway;
* **ours**: the floor's imports, then ``import alembic_autolock`` and the first
  ``ensure_migrated(engine)``: the figure is what it costs *beyond* the floor (target: 10 ms at
  500 revisions, 20 ms at 2000);
* **ours, no manifest** (``cache_dir = off``): the history loaded with Alembic every time;
* **plain Alembic**: ``ScriptDirectory.from_config(cfg).get_heads()`` beside
  ``MigrationContext.get_current_heads()`` (Alembic's own cheapest "at head?"), beyond the floor.

Then the readiness probe as a command, wall time per call: ``alembic-autolock check``,
``alembic current``, and ``python -c "import sqlalchemy, psycopg2"`` (starting Python).
Prints a table (median and p95 in milliseconds); ``--json FILE`` writes it.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PG = os.environ.get("AUTOLOCK_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432")

CHILD = r"""
import sys, time
t0 = time.perf_counter()
import sqlalchemy, psycopg2
from sqlalchemy import create_engine, text
mode, url, ini, cache = sys.argv[1:5]
engine = create_engine(url)
if mode == "floor":
    with engine.connect() as conn:
        conn.execute(text("SELECT 1")).all()
elif mode == "ours":
    import alembic_autolock
    settings = {"cache_dir": cache}
    result = alembic_autolock.ensure_migrated(engine, config=ini, **settings)
    assert result.action == "current", result
elif mode == "plain":
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    heads = set(ScriptDirectory.from_config(Config(ini)).get_heads())
    with engine.connect() as conn:
        assert set(MigrationContext.configure(conn).get_current_heads()) == heads
print(f"{(time.perf_counter() - t0) * 1000:.3f}")
"""

REVISION = '''"""revision {n}"""
import sqlalchemy as sa
from alembic import op

revision: str = "{rev}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("t{n}", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("t{n}")
'''


def history(root: Path, count: int, url: str) -> str:
    versions = root / "versions"
    versions.mkdir(parents=True)
    (root / "env.py").write_text(
        "from alembic_autolock.env import run_migrations\nrun_migrations()\n"
    )
    down = None
    for n in range(count):
        rev = f"{n:05d}cafe"
        (versions / f"{rev}_revision_{n}.py").write_text(REVISION.format(n=n, rev=rev, down=down))
        down = rev
    ini = root / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {root}\nsqlalchemy.url = {url}\n")
    return str(ini)


def run_child(mode: str, url: str, ini: str, cache: str, env: dict[str, str]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, url, ini, cache],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=env, check=False)
    return (time.perf_counter() - start) * 1000


def stats(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,500,2000")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="50 revisions, 3 runs")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    sizes = [50] if args.quick else [int(s) for s in args.sizes.split(",")]
    runs = 3 if args.quick else args.runs

    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    # byte-compile the library as pip does at install time (the revisions stay uncompiled)
    compileall.compile_dir(str(REPO / "alembic_autolock"), quiet=1)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    env.pop("ALEMBIC_AUTOLOCK_CACHE_DIR", None)
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    rows = []
    with tempfile.TemporaryDirectory(prefix="autolock-cold-") as tmp:
        for count in sizes:
            name = f"autolock_bench_cold_{uuid.uuid4().hex[:8]}"
            url = f"{PG}/{name}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                root = Path(tmp) / f"h{count}"
                ini = history(root, count, url)
                cache = str(Path(tmp) / f"cache{count}")
                from alembic_autolock import upgrade

                engine = create_engine(url, poolclass=NullPool)
                upgrade(engine, config=ini, cache_dir=cache)  # at head, and the manifest written
                engine.dispose()
                figures: dict[str, list[float]] = {"floor": [], "ours": [], "off": [], "plain": []}
                for _ in range(runs):  # interleaved, so that load drift hits all alike
                    figures["floor"].append(run_child("floor", url, ini, cache, env))
                    figures["ours"].append(run_child("ours", url, ini, cache, env))
                    figures["off"].append(run_child("ours", url, ini, "off", env))
                    figures["plain"].append(run_child("plain", url, ini, cache, env))
                floor = statistics.median(figures["floor"])
                for label, key in (
                    ("floor: sqlalchemy + driver imports, first connect", "floor"),
                    ("ours: + import + first ensure_migrated", "ours"),
                    ("ours without manifest (cache_dir = off)", "off"),
                    ("plain Alembic: load scripts + current heads", "plain"),
                ):
                    median, p95 = stats(figures[key])
                    rows.append(
                        {
                            "revisions": count,
                            "what": label,
                            "median_ms": round(median, 1),
                            "p95_ms": round(p95, 1),
                            "beyond_floor_ms": None if key == "floor" else round(median - floor, 1),
                        }
                    )
                # the readiness probe as a command
                bin_dir = Path(sys.executable).parent
                for label, argv in (
                    (
                        "alembic-autolock check",
                        [str(bin_dir / "alembic-autolock"), "-c", ini, "check"],
                    ),
                    ("alembic current", [str(bin_dir / "alembic"), "-c", ini, "current"]),
                    (
                        "python -c 'import sqlalchemy, psycopg2'",
                        [sys.executable, "-c", "import sqlalchemy, psycopg2"],
                    ),
                ):
                    probe_env = dict(env, ALEMBIC_AUTOLOCK_CACHE_DIR=cache)
                    times = [wall(argv, probe_env) for _ in range(max(3, runs // 2))]
                    median, p95 = stats(times)
                    rows.append(
                        {
                            "revisions": count,
                            "what": f"command: {label}",
                            "median_ms": round(median, 1),
                            "p95_ms": round(p95, 1),
                            "beyond_floor_ms": None,
                        }
                    )
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    load = os.getloadavg()
    print(f"fresh processes, PYTHONDONTWRITEBYTECODE=1, {runs} runs each; load {load[0]:.1f}")
    print(f"{'revs':>5}  {'measurement':55} {'median':>8} {'p95':>8} {'beyond floor':>13}")
    for r in rows:
        beyond = "" if r["beyond_floor_ms"] is None else f"{r['beyond_floor_ms']:.1f} ms"
        print(
            f"{r['revisions']:>5}  {r['what']:55} {r['median_ms']:>6.1f}ms {r['p95_ms']:>6.1f}ms"
            f" {beyond:>13}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
