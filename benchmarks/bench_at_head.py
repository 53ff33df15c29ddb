"""A whole ``ensure_migrated`` that finds the database at head, without the cache's answer.

Two cases, on PostgreSQL and on MariaDB:

* ``cache_ttl=0``: no "at head" answer is kept, so every call reads the version table
  (target: PERF-001, < 100 ms check overhead); the prepared run (configuration, settings,
  scripts) is kept for the process in both cases;
* cache expired: the "at head" answer has run out, so the call reads the version table.
  Simulated by emptying ``alembic_autolock._state.heads`` (a private dict) before each call.

Compared with plain Alembic's no-op ``command.upgrade(cfg, "head")`` on the app's pooled
connection and with the cookbook check (``MigrationContext.get_current_heads()`` vs a
``ScriptDirectory`` built once), in the same process against the same database.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from _common import (
    Row,
    masked,
    measure,
    migrate_to_head,
    mysql_database,
    parse_args,
    pg_database,
    report,
    restore_sys_path,
    scaled,
    unique_namespace,
    write_environments,
)
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from alembic import command
from alembic_autolock import _state, ensure_migrated

TARGET_NS = 100e6  # PERF-001: < 100 ms check overhead


def run_backend(
    label: str, database: Callable[[], AbstractContextManager[str]], counts: dict[str, int]
) -> list[Row]:
    """All measurements against one server."""
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        envs = write_environments(Path(tmp), url, unique_namespace("head"))
        migrate_to_head(envs)
        engine = create_engine(url)
        saved = list(sys.path)
        after = restore_sys_path(saved)
        config = str(envs.ours)
        try:

            def no_cache() -> None:
                if ensure_migrated(engine, config=config, cache_ttl=0).action != "current":
                    raise RuntimeError("expected action 'current'")

            def expired() -> None:
                _state.heads.clear()
                if ensure_migrated(engine, config=config).action != "current":
                    raise RuntimeError("expected action 'current'")

            cfg = Config(str(envs.plain))

            def plain_upgrade() -> None:
                with engine.begin() as conn:
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")

            script_heads = set(ScriptDirectory.from_config(cfg).get_heads())

            def cookbook_check() -> bool:
                with engine.connect() as conn:
                    return set(MigrationContext.configure(conn).get_current_heads()) == script_heads

            n, warm = counts["ours"], counts["warm"]
            ours_no_cache = measure(no_cache, iterations=n, warmup=warm, after=after)
            ours_expired = measure(expired, iterations=counts["expired"], warmup=warm)
            plain = measure(plain_upgrade, iterations=n, warmup=warm, after=after)
            check = measure(cookbook_check, iterations=counts["expired"], warmup=warm)
        finally:
            sys.path[:] = saved
            engine.dispose()
            _state.reset()
    group = f"at head, no cached answer: {label} ({masked(url)})"
    a = "ensure_migrated(cache_ttl=0)"
    b = "ensure_migrated, cache expired"
    return [
        Row(group, a, ours_no_cache, "command.upgrade no-op, shared pooled conn", plain, TARGET_NS),
        Row(group, a, ours_no_cache, "cookbook check, ScriptDirectory built once", check, None),
        Row(group, b, ours_expired, "command.upgrade no-op, shared pooled conn", plain, TARGET_NS),
        Row(group, b, ours_expired, "cookbook check, ScriptDirectory built once", check, None),
    ]


def main() -> None:
    """Measure, print the table."""
    args = parse_args(__doc__ or "")
    q = args.quick
    counts = {"ours": scaled(40, q), "expired": scaled(300, q), "warm": scaled(5, q)}
    rows = run_backend("PostgreSQL", pg_database, counts)
    rows += run_backend("MariaDB", mysql_database, counts)
    extra = [
        f"iterations: cache_ttl=0 and plain upgrade {counts['ours']} each; cache expired and "
        f"cookbook check {counts['expired']} each; {counts['warm']} warm-up calls before each.",
        "Both ensure_migrated variants reuse the prepared run (config, settings, scripts); "
        "only the database is read again.",
    ]
    report("ensure_migrated at head without the cache", rows, json_path=args.json, extra=extra)


if __name__ == "__main__":
    main()
