"""The fence: a holder that lost its lock never runs revision code beside the next holder.

The history (tests/migrations_batches) multiplies 30 balances by 100 in three batches, each
committed on its own (an autocommit block, like a large backfill). The first holder pauses
after batch 0 with its migration session idle, outside any transaction; then its lock is
taken away (``unlock --force``, or a Redis lock that expires while the holder is frozen). The
next holder must neither run the batches again beside it nor re-run the half-done revision:
before the fence it did both (batches A:0 B:0 B:1 B:2 A:1 A:2, balances x10 000 and "current").
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from structlog.testing import capture_logs
from support import (
    BATCHES,
    DATABASE_KINDS,
    PG_DRIVERS,
    database_url,
    heads_of,
    start_worker,
    wait_for,
    worker_env,
)

from alembic_autolock import MigrationInterrupted, ensure_migrated
from alembic_autolock._runner import resolve
from alembic_autolock.cli import main
from alembic_autolock.locks.redis import key_name


def balances(url: str) -> dict[int, int]:
    """Each batch's rows (id % 3) and the set of balances they have."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, balance FROM accounts")).all()
    finally:
        engine.dispose()
    by_batch: dict[int, set[int]] = {}
    for ident, balance in rows:
        by_batch.setdefault(ident % 3, set()).add(balance)
    return {batch: min(values) for batch, values in by_batch.items() if len(values) == 1}


def paused_holder(ini: str, url: str, trace: Any) -> Any:
    """A worker that holds the lock, paused after b2's first batch committed."""
    proc = start_worker(
        ini,
        url,
        env=worker_env(AUTOLOCK_TEST_PAUSE_AT="b2:batch0", AUTOLOCK_TEST_TRACE=str(trace.path)),
    )
    assert wait_for(lambda: ["b2", "up", str(proc.pid), "pause-batch0"] in trace.lines(), 30)
    return proc


def batch_lines(trace: Any) -> list[tuple[str, str]]:
    """(process id, batch) for every committed batch, in order."""
    return [(p[2], p[3]) for p in trace.lines() if len(p) == 4 and p[3].startswith("batch")]


@pytest.mark.parametrize("kind", DATABASE_KINDS)
def test_forced_unlock_never_lets_two_processes_run_the_batches(
    kind: str,
    request: pytest.FixtureRequest,
    make_ini: Any,
    make_engine: Any,
    trace: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """unlock --force while the holder pauses between committed batches: its migration
    session is ended with its lock, so it cannot run another batch; the next run refuses to
    re-run the half-done revision, naming it, the holder and how to resolve it."""
    url = database_url(request, kind)
    ini = make_ini(url, scripts=BATCHES, transaction="per-migration")
    holder = paused_holder(ini, url, trace)
    try:
        assert main(["-c", ini, "unlock", "--force", "--yes"]) == 0
        cleared = [line for line in capsys.readouterr().out.splitlines() if "cleared" in line]
        assert len(cleared) == 2  # the lock session and the migration session (the fence)
        engine = make_engine(url)
        with pytest.raises(MigrationInterrupted) as info:
            ensure_migrated(engine, config=ini, timeout=10, orphan_wait=0.5)
        err = info.value
        assert (err.revision, err.direction, err.failed) == ("b2", "upgrade", False)
        assert f"pid {holder.pid} on " in err.holder
        assert "resolve b2 --applied" in str(err) and "resolve b2 --not-applied" in str(err)
        assert heads_of(url) == {"b1"}
        # the paused holder resumes into a dead session: no further batch commits
        os.kill(holder.pid, signal.SIGALRM)  # wakes time.sleep; SIGALRM's default ends it
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert batch_lines(trace) == [(str(holder.pid), "batch0")]
    assert balances(url) == {0: 100, 1: 1, 2: 1}
    # the operator completes the backfill by hand, then says the revision is applied
    with make_engine(url).begin() as conn:
        conn.execute(text("UPDATE accounts SET balance = balance * 100 WHERE mod(id, 3) <> 0"))
    assert resolve(make_engine(url), "b2", applied=True, config=ini) == ("b2",)
    assert ensure_migrated(make_engine(url), config=ini, cache_ttl=0).action == "current"
    assert balances(url) == {0: 100, 1: 100, 2: 100}


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_frozen_redis_holder_is_fenced_out(
    pg_url: str, redis_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A holder frozen (SIGSTOP) past lock_ttl between batches loses its Redis lock; the next
    holder waits orphan_wait for its migration session (the fence), ends it, and refuses to
    re-run b2. When the frozen holder wakes it runs no further batch: LockLost."""
    namespace = f"fence-{os.getpid()}-{time.monotonic_ns()}"
    ini = make_ini(
        pg_url,
        scripts=BATCHES,
        lock=redis_url,
        namespace=namespace,
        lock_ttl=2,
        transaction="per-migration",
    )
    client = redis.Redis.from_url(redis_url)
    holder = paused_holder(ini, pg_url, trace)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        assert wait_for(lambda: client.get(f"lock:{key_name(namespace)}") is None, 10)
        with capture_logs() as logs, pytest.raises(MigrationInterrupted) as info:
            ensure_migrated(make_engine(pg_url), config=ini, timeout=10, orphan_wait=1)
        assert info.value.revision == "b2"
        fence = [e["event"] for e in logs if e["event"].startswith("orphan.")]
        assert fence == ["orphan.waiting", "orphan.terminated"]
        os.kill(holder.pid, signal.SIGCONT)
        os.kill(holder.pid, signal.SIGALRM)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
        client.delete(f"lock:{key_name(namespace)}", f"lock:{key_name(namespace)}:waiter")
        client.close()
    assert batch_lines(trace) == [(str(holder.pid), "batch0")]
    assert balances(pg_url) == {0: 100, 1: 1, 2: 1}
