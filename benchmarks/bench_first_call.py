"""Target 2: the first ``ensure_migrated`` in a fresh process, database at head (PostgreSQL).

The example history is used as shipped: the repo's alembic.ini and alembic/ (5 revisions). Each
measurement is a new interpreter (``_first_call_child.py``) that times ``import alembic,
sqlalchemy``, then ``import alembic_autolock``, then the first call, and prints the figures.
Variants run round-robin so that drift on the machine hits all of them alike; the first rounds
are warm-ups (page cache, and the bytecode cache in the second scenario) and are discarded.

Plain Alembic, in the same run: ``command.upgrade(cfg, "head")`` as a no-op in a fresh process,
with a stock env.py over the same revision files (the cookbook's shared connection, and the
CLI-like env.py that makes its own engine).

Two scenarios:

* as configured: the environment as it is (this machine exports PYTHONDONTWRITEBYTECODE=1, so
  alembic_autolock and the revision files are compiled from source in every process; site-packages
  have the .pyc files pip wrote);
* bytecode cached: PYTHONPYCACHEPREFIX points at a temporary directory and bytecode writing is
  allowed, so every module and revision file loads from a .pyc (nothing is written to the tree).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    REPO_INI,
    Row,
    Sample,
    masked,
    migrate_to_head,
    parse_args,
    pg_database,
    report,
    unique_namespace,
    write_environments,
)

CHILD = Path(__file__).with_name("_first_call_child.py")
TARGET_NS = 15e6  # 15 ms beyond the cost of importing Alembic


def run_rounds(
    variants: dict[str, tuple[str, str]],
    *,
    rounds: int,
    warmup: int,
    env: dict[str, str],
) -> dict[str, list[dict[str, int]]]:
    """Run every variant once per round; return the timings of the non-warm-up rounds.

    ``variants`` maps a variant name to (url, ini). Each record also gets ``wall_ns``: spawn to
    exit, as the parent sees it (interpreter start-up included).
    """
    results: dict[str, list[dict[str, int]]] = {v: [] for v in variants}
    for i in range(warmup + rounds):
        for variant, (url, ini) in variants.items():
            args = [sys.executable, str(CHILD), variant, url, ini]
            if variant.startswith("ours"):
                args.append(unique_namespace("first"))
            start = time.perf_counter_ns()
            proc = subprocess.run(
                args, capture_output=True, text=True, env=env, cwd=REPO, check=False
            )
            wall = time.perf_counter_ns() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{variant} child failed:\n{proc.stderr}")
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            expected = "current" if variant.startswith("ours") else "upgrade no-op"
            if record["action"] != expected:
                raise RuntimeError(f"{variant}: action {record['action']!r}, not {expected!r}")
            record["wall_ns"] = wall
            if i >= warmup:
                results[variant].append(record)
    return results


def sample(records: list[dict[str, int]], *keys: str) -> Sample:
    """The distribution of the sum of ``keys`` over the records."""
    return Sample.of([sum(int(r[k]) for k in keys) for r in records])


def scenario_rows(label: str, res: dict[str, list[dict[str, int]]]) -> list[Row]:
    """The table rows of one scenario."""
    group = f"2. first call in a fresh process, PostgreSQL: {label}"
    rows = [
        Row(
            group,
            "import alembic, sqlalchemy (ours' processes)",
            sample(res["ours"], "import_alembic_ns"),
            "the same, plain processes",
            sample(res["plain_shared"], "import_alembic_ns"),
            None,
        ),
        Row(
            group,
            "import alembic_autolock, after alembic",
            sample(res["ours"], "import_extra_ns"),
            "import alembic.command, alembic.config",
            sample(res["plain_shared"], "import_extra_ns"),
            None,
        ),
        Row(
            group,
            "first ensure_migrated, engine not connected",
            sample(res["ours"], "call_ns"),
            "connect + command.upgrade no-op (cookbook)",
            sample(res["plain_shared"], "call_ns"),
            TARGET_NS,
            note="engine created before the clock starts, no connection made yet: the call "
            "includes the first connect (and SQLAlchemy's dialect initialisation)",
        ),
        Row(
            group,
            "import alembic_autolock + first call",
            sample(res["ours"], "import_extra_ns", "call_ns"),
            "import alembic.command + connect + upgrade",
            sample(res["plain_shared"], "import_extra_ns", "call_ns"),
            TARGET_NS,
            note="everything ours adds beyond `import alembic, sqlalchemy`",
        ),
    ]
    if "ours_pooled" in res:
        rows.append(
            Row(
                group,
                "first ensure_migrated, connection pooled",
                sample(res["ours_pooled"], "call_ns"),
                "command.upgrade no-op, pooled conn",
                sample(res["plain_shared_pooled"], "call_ns"),
                TARGET_NS,
                note="engine.connect().close() ran before the clock started (a connection "
                "waits in the pool, the dialect is initialised)",
            )
        )
    if "plain_cli" in res:
        rows.append(
            Row(
                group,
                "create_engine + first ensure_migrated",
                sample(res["ours"], "create_engine_ns", "call_ns"),
                "command.upgrade, env.py's own engine",
                sample(res["plain_cli"], "call_ns"),
                None,
                note="both include create_engine (which imports psycopg2) and the first connect",
            )
        )
    rows.append(
        Row(
            group,
            "whole process, spawn to exit (ours)",
            sample(res["ours"], "wall_ns"),
            "the same, plain (cookbook)",
            sample(res["plain_shared"], "wall_ns"),
            None,
        )
    )
    return rows


def main() -> None:
    """Measure, print the table."""
    args = parse_args(__doc__ or "")
    rounds = 3 if args.quick else 10
    rounds_cached = 3 if args.quick else 10
    with pg_database() as url, tempfile.TemporaryDirectory() as tmp:
        envs = write_environments(Path(tmp), url, unique_namespace("first"))
        migrate_to_head(envs)
        ours = (url, str(REPO_INI))
        plain = (url, str(envs.plain))
        as_configured = dict(os.environ)
        res = run_rounds(
            {
                "ours": ours,
                "ours_pooled": ours,
                "plain_shared": plain,
                "plain_shared_pooled": plain,
                "plain_cli": plain,
            },
            rounds=rounds,
            warmup=1,
            env=as_configured,
        )
        try:  # the stages of the first call, through private functions that may change
            res_parts = run_rounds(
                {"ours_parts": ours}, rounds=3 if args.quick else 5, warmup=0, env=as_configured
            )["ours_parts"]
        except RuntimeError as exc:
            print(f"(first-call stages not measured: {str(exc).splitlines()[-1]})")
            res_parts = []
        cached_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",)}
        cached_env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        res_cached = run_rounds(
            {"ours": ours, "plain_shared": plain},
            rounds=rounds_cached,
            warmup=1,
            env=cached_env,
        )
    dont_write = os.environ.get("PYTHONDONTWRITEBYTECODE", "")
    rows = scenario_rows(f"as configured (PYTHONDONTWRITEBYTECODE={dont_write!r})", res)
    rows += scenario_rows("bytecode cached (PYTHONPYCACHEPREFIX)", res_cached)
    pycache = (REPO / "alembic_autolock" / "__pycache__").is_dir()
    extra = [
        f"database: {masked(url)}, at head; ours: config={REPO_INI} (5 revisions); plain: stock "
        "env.py over the same revision files",
        f"fresh processes: {rounds} per variant as configured (after 1 warm-up round), "
        f"{rounds_cached} per variant with bytecode cached (after 1 warm-up round that writes "
        "the .pyc files); medians over processes",
        f"alembic_autolock/__pycache__ present in the tree: {pycache}",
    ]
    components = [
        (f"first call, as configured: {label}", sample(res_parts, key))
        for label, key in (
            ("_plan.prepare (config, settings, scripts)", "prepare_ns"),
            ("first engine.connect() (new connection, dialect init)", "connect_ns"),
            ("_plan.read_heads on the pooled connection", "read_heads_ns"),
        )
        if res_parts
    ]
    report(
        "first call in a fresh process",
        rows,
        json_path=args.json,
        extra=extra,
        components=components,
    )


if __name__ == "__main__":
    main()
