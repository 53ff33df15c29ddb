"""Helpers for the tests: reading heads, and real worker processes released at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS = REPO / "tests" / "migrations"
BATCHES = REPO / "tests" / "migrations_batches"  # b1: 30 accounts; b2: x100 in 3 committed batches
WORKER = REPO / "tests" / "worker.py"
ALL_REVS = ["r1", "r2", "r3", "r4", "r5"]

# The PostgreSQL drivers a test runs with when it is marked
# @pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True): psycopg2, and psycopg 3, which
# is what a bare postgresql:// URL means under SQLAlchemy 2.1.
PG_DRIVERS = ["psycopg2", "psycopg"]
PG_SCHEMES = {"psycopg2": "postgresql+psycopg2", "psycopg": "postgresql"}


def with_driver(url: str, driver: str) -> str:
    """``url`` (a postgresql+psycopg2:// URL) for another PostgreSQL driver of PG_DRIVERS."""
    return url.replace("postgresql+psycopg2://", PG_SCHEMES[driver] + "://", 1)


# For tests parametrized by server: PostgreSQL through psycopg2 or psycopg 3, or MariaDB.
DATABASE_KINDS = ["postgresql", "psycopg", "mysql"]


def database_url(request: Any, kind: str) -> str:
    """A fresh database of ``kind`` (one of DATABASE_KINDS) for the requesting test."""
    if kind == "mysql":
        return str(request.getfixturevalue("mysql_url"))
    url = str(request.getfixturevalue("pg_url"))
    return with_driver(url, "psycopg") if kind == "psycopg" else url


def heads_of(
    url: str, version_table: str = "alembic_version", schema: str | None = None
) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"version_table": version_table, "version_table_schema": schema}
            )
            return set(ctx.get_current_heads())
    finally:
        engine.dispose()


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@dataclass
class Outcome:
    returncode: int
    data: dict[str, Any]
    stderr: str


def start_worker(
    config: str, url: str, *args: str, barrier: bool = False, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(WORKER), config, url, *args]
    if barrier:
        cmd.append("--barrier")
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or worker_env(),
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Outcome:
    out, err = proc.communicate(timeout=timeout)
    last = [line for line in out.splitlines() if line.startswith("{")]
    data = json.loads(last[-1]) if last else {}
    return Outcome(proc.returncode, data, err)


def stampede(
    n: int, config: str, url: str, *args: str, env: dict[str, str] | None = None
) -> list[Outcome]:
    """Start n workers, wait until each is ready, release them at once, collect outcomes."""
    procs = [start_worker(config, url, *args, barrier=True, env=env) for _ in range(n)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
        for proc in procs:  # the release: one line each, as fast as a loop writes
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [finish(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextmanager
def holder_hanging_in(
    ini: str, url: str, trace: Any, rev: str, *args: str
) -> Iterator[subprocess.Popen[str]]:
    """A worker process that holds the lock while it hangs inside revision ``rev``."""
    proc = start_worker(
        ini,
        url,
        *args,
        env=worker_env(AUTOLOCK_TEST_HANG_AT=rev, AUTOLOCK_TEST_TRACE=str(trace.path)),
    )
    try:
        assert wait_for(lambda: [rev, "up", str(proc.pid), "hang"] in trace.lines(), 30)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
