"""Many processes and threads at once, crashing holders, and the plain alembic CLI, on real
PostgreSQL and SQLite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import pytest
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.pool import StaticPool
from support import (
    ALL_REVS,
    PG_DRIVERS,
    finish,
    heads_of,
    holder_hanging_in,
    stampede,
    start_worker,
    wait_for,
    worker_env,
)

from alembic import command
from alembic_autolock import LockTimeout, ensure_migrated

ALEMBIC = os.path.join(os.path.dirname(sys.executable), "alembic")


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_twenty_processes_released_at_once_migrate_exactly_once(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """20 processes start together on an empty database: one applies each revision once,
    all succeed, the rest wait and find the work done."""
    ini = make_ini(pg_url)
    outcomes = stampede(20, ini, pg_url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.05"))
    assert [o.returncode for o in outcomes] == [0] * 20, [o.data for o in outcomes]
    assert trace.bodies() == ALL_REVS
    applied = Counter(rev for o in outcomes for rev in o.data["applied"])
    assert applied == Counter(ALL_REVS)
    actions = Counter(o.data["action"] for o in outcomes)
    assert actions["upgraded"] == 1
    assert actions["upgraded"] + actions["current"] == 20
    assert all(o.data["heads"] == ["r5"] for o in outcomes)
    assert heads_of(pg_url) == {"r5"}


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_concurrent_plain_alembic_cli_runs_take_the_lock(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """8 concurrent `alembic upgrade head` runs through the env.py hook all succeed, and each
    revision body runs once."""
    ini = make_ini(pg_url)
    env = worker_env(AUTOLOCK_TEST_SLEEP="0.05", AUTOLOCK_TEST_TRACE=str(trace.path))
    procs = [
        subprocess.Popen(
            [ALEMBIC, "-c", ini, "upgrade", "head"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(8)
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    assert [code for code, _ in results] == [0] * 8, results
    assert trace.bodies() == ALL_REVS
    assert heads_of(pg_url) == {"r5"}


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_lock_timeout_names_the_holder(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A waiter with timeout=1 gets LockTimeout after about a second, naming the holder's
    application_name (with the holder's process id) and how long it waited."""
    ini = make_ini(pg_url)
    with holder_hanging_in(ini, pg_url, trace, "r2") as holder:
        with pytest.raises(LockTimeout) as info:
            ensure_migrated(make_engine(pg_url), config=ini, timeout=1)
    err = info.value
    assert 1.0 <= err.waited_s < 3.0
    [held] = [h for h in err.holders if h.role == "lock"]
    assert held.owner is not None and held.owner.startswith("autolock:lock:")
    assert f":{holder.pid}:" in held.owner
    assert held.owner in str(err) and "timed out after 1." in str(err)


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_killed_holder_does_not_block_the_next_process(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A holder killed with SIGKILL inside revision r3: the next process gets the lock within
    5 s and finishes the job from the last committed revision (r2)."""
    ini = make_ini(pg_url, transaction="per-migration")
    with holder_hanging_in(ini, pg_url, trace, "r3") as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    result = ensure_migrated(make_engine(pg_url), config=ini, timeout=5)
    assert result.waited_s < 5
    assert (result.action, result.applied) == ("upgraded", ("r3", "r4", "r5"))
    assert trace.bodies() == ["r1", "r2", "r3", "r3", "r4", "r5"]


def in_two_threads(engine: Any, ini: str) -> list[Any]:
    """ensure_migrated from two threads released together; their results."""
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def run() -> None:
        barrier.wait()
        results.append(ensure_migrated(engine, config=ini))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_two_threads_of_one_process(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads calling ensure_migrated at once: one migrates, the other waits and finds
    the database at head."""
    monkeypatch.setenv("AUTOLOCK_TEST_SLEEP", "0.05")
    results = in_two_threads(make_engine(pg_url), make_ini(pg_url))
    assert sorted(r.action for r in results) == ["current", "upgraded"]
    assert trace.bodies() == ALL_REVS


def test_sqlite_file_processes_exclude_each_other(
    sqlite_url: str, make_ini: Any, trace: Any
) -> None:
    """Six processes on one SQLite file: the file lock beside it lets one migrate."""
    ini = make_ini(sqlite_url)
    outcomes = stampede(6, ini, sqlite_url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.05"))
    assert [o.returncode for o in outcomes] == [0] * 6, [o.data for o in outcomes]
    assert trace.bodies() == ALL_REVS
    assert Counter(o.data["action"] for o in outcomes)["upgraded"] == 1
    assert heads_of(sqlite_url) == {"r5"}
    assert os.path.exists(sqlite_url.removeprefix("sqlite:///") + "-autolock")


def test_sqlite_lock_timeout_names_the_holding_process(
    sqlite_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """On SQLite a waiter that times out is told the holder's pid and host."""
    ini = make_ini(sqlite_url)
    with holder_hanging_in(ini, sqlite_url, trace, "r1") as holder:
        with pytest.raises(LockTimeout) as info:
            ensure_migrated(make_engine(sqlite_url), config=ini, timeout=0.3)
    assert f"pid {holder.pid} on " in str(info.value)


def test_sqlite_in_memory_threads(make_ini: Any, trace: Any) -> None:
    """An in-memory SQLite database (one connection shared by threads): the process-local
    lock makes two threads apply each revision once."""
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    results = in_two_threads(engine, make_ini("sqlite://"))
    assert sorted(r.action for r in results) == ["current", "upgraded"]
    assert trace.bodies() == ALL_REVS
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "r5"


class EngineLike:
    """What pytest-alembic passes: not an Engine, but has .connect()."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def connect(self) -> Any:
        return self.engine.connect()


@pytest.mark.parametrize("kind", ["connection", "engine", "engine-like"])
@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_env_hook_accepts_connection_engine_or_engine_like(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any, kind: str
) -> None:
    """command.upgrade with config.attributes['connection'] set to a Connection, an Engine or
    an engine-like object: the hook migrates that database under the lock."""
    engine = make_engine(pg_url)
    cfg = Config(make_ini("postgresql+psycopg2://nobody@127.0.0.1:1/not-this-one"))
    if kind == "connection":
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
    else:
        cfg.attributes["connection"] = engine if kind == "engine" else EngineLike(engine)
        command.upgrade(cfg, "head")
    assert heads_of(pg_url) == {"r5"}
    assert trace.bodies() == ALL_REVS


def test_cli_run_waits_for_a_running_ensure_migrated(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """A plain `alembic upgrade head` started while another process migrates waits for the
    same lock, then finds nothing left to do."""
    ini = make_ini(pg_url)
    first = start_worker(
        ini, pg_url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.3", AUTOLOCK_TEST_TRACE=str(trace.path))
    )
    assert wait_for(lambda: trace.bodies() != [], 30)
    cli = subprocess.run(
        [ALEMBIC, "-c", ini, "upgrade", "head"],
        capture_output=True,
        text=True,
        env=worker_env(AUTOLOCK_TEST_TRACE=str(trace.path)),
        timeout=120,
        check=False,
    )
    outcome = finish(first)
    assert (cli.returncode, outcome.returncode) == (0, 0), (cli.stderr, outcome.data)
    assert outcome.data["applied"] == ALL_REVS
    assert trace.bodies() == ALL_REVS
