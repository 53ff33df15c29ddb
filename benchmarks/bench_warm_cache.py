"""Target 1: a warm ``ensure_migrated`` call at head, answered from the in-process cache.

Compared, in the same process and against the same PostgreSQL database, with what a plain
Alembic app does at start to check or upgrade: ``command.upgrade(cfg, "head")`` as a no-op (the
cookbook's shared connection, and the stock env.py that makes its own engine), and the cookbook
check ``MigrationContext.get_current_heads()`` vs ``ScriptDirectory.get_heads()``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _common import (
    Row,
    fmt_ns,
    masked,
    measure,
    migrate_to_head,
    parse_args,
    pg_database,
    report,
    restore_sys_path,
    scaled,
    timer_overhead_ns,
    unique_namespace,
    write_environments,
)
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from alembic import command
from alembic_autolock import _state, ensure_migrated

TARGET_NS = 20_000.0  # 20 µs


def main() -> None:
    """Measure, print the table."""
    args = parse_args(__doc__ or "")
    q = args.quick
    with pg_database() as url, tempfile.TemporaryDirectory() as tmp:
        envs = write_environments(Path(tmp), url, unique_namespace("warm"))
        migrate_to_head(envs)
        engine = create_engine(url)
        try:
            rows, extra = run(engine, envs.ours, envs.plain, q)
        finally:
            engine.dispose()
            _state.reset()
    extra.insert(0, f"database: {masked(url)} (PostgreSQL, at head, 5 revisions)")
    report("warm call at head (in-process cache)", rows, json_path=args.json, extra=extra)


def run(
    engine: Engine, ours_ini: Path, plain_ini: Path, quick: bool
) -> tuple[list[Row], list[str]]:
    """All measurements; returns the rows and the notes to print above the table."""
    config = str(ours_ini)
    first = ensure_migrated(engine, config=config)  # builds the plan, reads the DB, fills the cache
    second = ensure_migrated(engine, config=config)
    notes = [
        f"first call: action={first.action!r}, {fmt_ns(first.elapsed_s * 1e9)}; "
        f"second call: action={second.action!r} (every timed call is checked to be 'cached')",
    ]
    if second.action != "cached":
        notes.append("WARNING: the second call was not served from the cache")

    def ours() -> None:
        if ensure_migrated(engine, config=config).action != "cached":
            raise RuntimeError("not served from the cache")

    n_ours = scaled(20_000, quick)
    ours_sample = measure(ours, iterations=n_ours, warmup=scaled(2_000, quick))

    saved = list(sys.path)
    after = restore_sys_path(saved)
    cfg = Config(str(plain_ini))

    def plain_upgrade_shared() -> None:
        with engine.begin() as conn:  # cookbook: share the app's (pooled) connection
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    cli_cfg = Config(str(plain_ini))

    def plain_upgrade_own_engine() -> None:
        command.upgrade(cli_cfg, "head")  # stock env.py: its own NullPool engine, new connection

    def cookbook_check() -> bool:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
        return current == set(ScriptDirectory.from_config(cfg).get_heads())

    script = ScriptDirectory.from_config(cfg)
    script_heads = set(script.get_heads())

    def cookbook_check_cached_script() -> bool:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads()) == script_heads

    n_plain = scaled(40, quick)
    upgrade_shared = measure(plain_upgrade_shared, iterations=n_plain, warmup=3, after=after)
    upgrade_own = measure(plain_upgrade_own_engine, iterations=n_plain, warmup=3, after=after)
    check_new = measure(cookbook_check, iterations=scaled(100, quick), warmup=5, after=after)
    check_cached = measure(cookbook_check_cached_script, iterations=scaled(1_000, quick), warmup=50)
    sys.path[:] = saved
    cfg.attributes.pop("connection", None)

    name = "ensure_migrated(engine, config=ini), cached"
    group = "1. warm call at head"
    rows = [
        Row(
            group,
            name,
            ours_sample,
            "command.upgrade(cfg,'head') no-op, shared pooled conn",
            upgrade_shared,
            TARGET_NS,
        ),
        Row(
            group,
            name,
            ours_sample,
            "command.upgrade(cfg,'head') no-op, env.py's own engine",
            upgrade_own,
            TARGET_NS,
        ),
        Row(
            group,
            name,
            ours_sample,
            "cookbook check, new ScriptDirectory per call",
            check_new,
            TARGET_NS,
        ),
        Row(
            group,
            name,
            ours_sample,
            "cookbook check, ScriptDirectory built once",
            check_cached,
            TARGET_NS,
        ),
    ]
    notes.append(
        f"timer overhead (two perf_counter_ns calls, included in every figure): "
        f"{fmt_ns(timer_overhead_ns())}"
    )
    notes.append(
        f"iterations: ours {n_ours} (after {scaled(2_000, quick)} warm-up calls); plain upgrade "
        f"{n_plain} each (3 warm-up); cookbook checks {check_new.n} / {check_cached.n}"
    )
    return rows, notes


if __name__ == "__main__":
    main()
