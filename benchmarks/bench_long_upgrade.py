"""A long upgrade: 300 revisions applied from base, through our env.py hook and through the
project's own (stock) env.py, on PostgreSQL, in the same run.

    .venv/bin/python benchmarks/bench_long_upgrade.py [--revisions 300] [--rounds 5] [--quick]

Each revision does what real ones do: creates a table with a few columns and an index, and
inserts a row. Both environments run ``alembic.command.upgrade(cfg, "head")`` in this process
on a fresh database each round (the rounds alternate, ours and stock, so that load drifts hit
both alike); the figure is the median wall time. Target: at most 3 % over the stock env.py.
Also measured: ``ensure_migrated`` on the same history (the runner's own path).
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import _LOGGING, PLAIN_ENV_PY, Row, Sample, parse_args, report
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"

REVISION = '''"""table {n}

Revision ID: {rev}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "{rev}"
down_revision = {down_repr}
branch_labels = None
depends_on = None


def upgrade():
    t = op.create_table(
        "t{n}",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("created", sa.DateTime, server_default=sa.func.now()),
    )
    op.create_index("ix_t{n}_name", "t{n}", ["name"])
    op.bulk_insert(t, [{{"id": 1, "name": "r{n}"}}])


def downgrade():
    op.drop_table("t{n}")
'''

OURS_ENV_PY = """from alembic_autolock.env import run_migrations

run_migrations()
"""


def write_history(root: Path, count: int) -> Path:
    versions = root / "versions"
    versions.mkdir(parents=True)
    down = None
    for n in range(count):
        rev = f"{n:04d}aaaaaaaa"
        (versions / f"{rev}.py").write_text(
            REVISION.format(n=n, rev=rev, down=down, down_repr=repr(down))
        )
        down = rev
    return versions


def write_env(root: Path, name: str, env_py: str, versions: Path, url: str, extra: str) -> str:
    env_dir = root / name
    env_dir.mkdir()
    (env_dir / "env.py").write_text(env_py)
    ini = root / f"{name}.ini"
    ini.write_text(
        "[alembic]\n"
        f"script_location = {env_dir}\n"
        f"version_locations = {versions}\n"
        "path_separator = os\n"
        f"sqlalchemy.url = {url}\n\n" + extra
    )
    return str(ini)


def fresh_database(admin: object, name: str) -> None:
    with admin.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))


def main() -> int:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--revisions", type=int, default=300)
    extra.add_argument("--rounds", type=int, default=5)
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = parse_args(__doc__.splitlines()[0])
    count = 30 if args.quick else known.revisions
    rounds = 2 if args.quick else known.rounds

    from alembic.config import Config

    from alembic import command
    from alembic_autolock import ensure_migrated

    name = f"autolock_bench_long_{uuid.uuid4().hex[:8]}"
    url = f"{PG}/{name}"
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    timings: dict[str, list[int]] = {"stock": [], "ours": [], "ensure": []}
    with tempfile.TemporaryDirectory(prefix="autolock-long-") as tmp:
        root = Path(tmp)
        versions = write_history(root / "history", count)
        stock_ini = write_env(root, "stock", PLAIN_ENV_PY, versions, url, _LOGGING)
        # the stock env.py runs the whole upgrade in one transaction (Alembic's default): so
        # does ours, by default; logging as the stock env.py's fileConfig leaves it
        ours_ini = write_env(root, "ours", OURS_ENV_PY, versions, url, _LOGGING)
        try:
            for _ in range(rounds):
                for label, ini in (("stock", stock_ini), ("ours", ours_ini)):
                    fresh_database(admin, name)
                    cfg = Config(ini)
                    start = time.perf_counter_ns()
                    command.upgrade(cfg, "head")
                    timings[label].append(time.perf_counter_ns() - start)
                fresh_database(admin, name)
                engine = create_engine(url, poolclass=NullPool)
                start = time.perf_counter_ns()
                result = ensure_migrated(engine, config=ours_ini)
                timings["ensure"].append(time.perf_counter_ns() - start)
                engine.dispose()
                if len(result.applied) != count:
                    raise RuntimeError(f"ensure_migrated applied {len(result.applied)}")
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    stock = Sample.of(timings["stock"])
    rows = [
        Row(
            "long upgrade",
            f"alembic upgrade head, {count} revisions, our env.py",
            Sample.of(timings["ours"]),
            "stock env.py",
            stock,
            target_ns=stock.median_ns * 1.03,
        ),
        Row(
            "long upgrade",
            f"ensure_migrated, {count} revisions",
            Sample.of(timings["ensure"]),
            "stock env.py",
            stock,
            target_ns=stock.median_ns * 1.03,
        ),
    ]
    report(
        "A long upgrade under the lock",
        rows,
        json_path=args.json,
        extra=[f"{rounds} rounds, alternating; target: at most 3 % over the stock env.py"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
