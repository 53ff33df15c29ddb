"""Fault injection: whatever fails, wherever, at most one process runs revision code at any
instant, the error says the state left behind, nothing stays held, and the next run finishes
the job or refuses clearly (docs/faults.md).

The history (tests/migrations_faults): f1 creates 30 accounts (transactional on PostgreSQL),
f2 multiplies their balances by 100 in three batches each committed on its own (an
autocommit block: a backfill), f3 creates a table. Every revision traces, to a file, when its
body began and each statement it completed, with the process id and a monotonic timestamp (the
same clock for every process of the machine): two processes whose traced activity overlaps in
time ran revision code at once. A balance of 10 000 is a batch run twice.

Faults land at exact points of a run without any hook in the library: a worker
(tests/fault_worker.py) subscribes to the library's events and signals itself or pauses on a
file barrier there, and the revisions pause on the same barrier between statements. The test
then acts as the world would: signals, server-side kills, ``unlock --force``, a Redis restart,
a Redis key left to expire while the holder is frozen, the network cut or stalled (the holder
reaches PostgreSQL through a TCP relay the test owns, tests/relay.py), a private PostgreSQL
restarted, a statement past the ``statement_timeout`` env.py's connection_setup sets.

Matrix: backend x phase x fault. ``AUTOLOCK_FULL_MATRIX=1`` runs every meaningful cell, the
default a CI subset; ``AUTOLOCK_SOAK=N`` adds N rounds of random faults against small fleets.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from relay import Relay
from servers import PrivatePostgres
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support import REPO, wait_for, worker_env

from alembic_autolock import _state
from alembic_autolock._runner import lock_holders
from alembic_autolock.cli import main as cli_main
from alembic_autolock.locks.mysql import lock_names
from alembic_autolock.locks.redis import key_name

FAULTS_DIR = REPO / "tests" / "migrations_faults"
sys.path.insert(0, str(FAULTS_DIR))  # the revisions import faults_behaviour
FAULT_WORKER = REPO / "tests" / "fault_worker.py"
HEAD = "f3"

BACKENDS = ["postgresql", "redis", "mysql", "sqlite"]

# Where a fault lands, and how the holder is brought there: a pause on a revision's barrier
# ("f2:batch0"), or an event of the library ("lock.acquired").
PHASES: dict[str, tuple[str, str]] = {
    "waiting": ("event", "lock.waiting"),  # the fault hits a waiter, not the holder
    "acquired": ("event", "lock.acquired"),  # just taken, before the second look
    "revision": ("pause", "f1:body"),  # inside a revision (transactional on PostgreSQL)
    "backfill": ("pause", "f2:start"),  # in a revision, before its autocommit block
    "batches": ("pause", "f2:batch0"),  # between committed autocommit batches
    "between": ("event", "migration.step:f1"),  # between two revisions
    "last": ("event", "migration.step:f3"),  # after the last revision, before commit/release
}

FAULTS = [
    "sigkill",  # the process dies at once
    "sigterm",  # SystemExit from the application's SIGTERM handler
    "sigstop",  # frozen (on Redis: past lock_ttl, so the key expires)
    "unlock",  # alembic-autolock unlock --force
    "kill-lock",  # pg_terminate_backend / KILL of the lock session
    "kill-migration",  # pg_terminate_backend / KILL of the migration session
    "redis-restart",  # the Redis server restarted (it keeps nothing on disk)
    "raise",  # a revision raises
    # the network and the server, PostgreSQL only (the holder reaches it through a TCP relay
    # the test owns, tests/relay.py; a restart needs a server of the test's own)
    "net-cut",  # every relayed connection closed at once (new ones pass)
    "net-stall",  # nothing forwarded, nothing closed, past the next run's timeout; resumed
    "net-stall-cut",  # the same, then cut (and the network back) instead of resumed
    "db-restart",  # the database server restarted (a private one: never the shared server)
    "statement-timeout",  # a statement runs past the migration connection's statement_timeout
]

NET_FAULTS = ("net-cut", "net-stall", "net-stall-cut")
NET_PHASES = ("acquired", "revision", "batches")
SLOW = {"revision": "f1:insert", "batches": "f2:batch0"}  # where a statement runs too long


def meaningful(backend: str, phase: str, fault: str) -> bool:
    if fault in (*NET_FAULTS, "db-restart"):
        return backend == "postgresql" and phase in NET_PHASES
    if fault == "statement-timeout":
        return backend == "postgresql" and phase in SLOW
    if phase == "waiting":
        return fault in ("sigkill", "sigterm", "sigstop")
    if fault == "redis-restart":
        return backend == "redis"
    if fault == "kill-lock":
        return backend in ("postgresql", "mysql")
    if fault == "kill-migration":  # before the migration session exists there is none
        return backend != "sqlite" and phase not in ("acquired",)
    if fault == "unlock":
        return backend != "sqlite" or phase == "revision"  # refused there: once is enough
    if fault == "raise":
        return phase in ("revision", "batches", "last")
    return True


FULL = [(b, p, f) for b in BACKENDS for p in PHASES for f in FAULTS if meaningful(b, p, f)]

# The CI subset: every fault and every phase at least once on each backend where it means
# something, the known defects among them.
CI = [
    ("postgresql", "waiting", "sigterm"),
    ("postgresql", "acquired", "sigterm"),
    ("postgresql", "acquired", "kill-lock"),
    ("postgresql", "revision", "sigkill"),
    ("postgresql", "batches", "unlock"),
    ("postgresql", "batches", "kill-migration"),
    ("postgresql", "between", "sigstop"),
    ("postgresql", "last", "sigkill"),
    ("postgresql", "last", "raise"),
    ("redis", "waiting", "sigkill"),
    ("redis", "acquired", "sigterm"),
    ("redis", "acquired", "sigstop"),
    ("redis", "batches", "sigstop"),
    ("redis", "revision", "redis-restart"),
    ("redis", "between", "unlock"),
    ("redis", "backfill", "unlock"),
    ("redis", "last", "sigterm"),
    ("mysql", "waiting", "sigstop"),
    ("mysql", "acquired", "kill-lock"),
    ("mysql", "revision", "sigkill"),
    ("mysql", "batches", "unlock"),
    ("mysql", "between", "kill-migration"),
    ("mysql", "last", "raise"),
    ("sqlite", "acquired", "sigterm"),
    ("sqlite", "batches", "sigkill"),
    ("sqlite", "revision", "raise"),
    ("postgresql", "acquired", "net-cut"),
    ("postgresql", "revision", "net-cut"),
    ("postgresql", "batches", "net-cut"),
    ("postgresql", "acquired", "net-stall"),
    ("postgresql", "revision", "net-stall"),
    ("postgresql", "batches", "net-stall-cut"),
    ("postgresql", "revision", "db-restart"),
    ("postgresql", "revision", "statement-timeout"),
    ("postgresql", "batches", "statement-timeout"),
]
assert all(case in FULL for case in CI), [case for case in CI if case not in FULL]

CASES = FULL if os.environ.get("AUTOLOCK_FULL_MATRIX") else CI


# --- the world: a database, a lock, a trace ---------------------------------------------------


@dataclass
class World:
    backend: str
    url: str
    ini: str
    trace_path: Path
    redis_server: Any = None
    private_pg: Any = None
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    # -- processes --

    def spawn(
        self,
        *,
        fault: str | None = None,
        pause: str | None = None,
        fail: str | None = None,
        linger: bool = False,
        op: str = "ensure",
        rev: str | None = None,
        url: str | None = None,
        env_extra: dict[str, str] | None = None,
        **settings: Any,
    ) -> subprocess.Popen[str]:
        env = worker_env(AUTOLOCK_FAULT_TRACE=str(self.trace_path))
        for key in ("AUTOLOCK_FAULT_AT", "AUTOLOCK_FAULT_PAUSE", "AUTOLOCK_FAULT_FAIL"):
            env.pop(key, None)
        for key in ("AUTOLOCK_FAULT_SLOW", "AUTOLOCK_FAULT_STATEMENT_TIMEOUT"):
            env.pop(key, None)
        env.update(env_extra or {})
        if fault:
            env["AUTOLOCK_FAULT_AT"] = fault
        if pause:
            env["AUTOLOCK_FAULT_PAUSE"] = pause
        if fail:
            env["AUTOLOCK_FAULT_FAIL"] = fail
        cmd = [sys.executable, str(FAULT_WORKER), self.ini, url or self.url, "--op", op]
        if rev:
            cmd += ["--rev", rev]
        for key, value in settings.items():
            cmd += ["--setting", f"{key}={value}"]
        if linger:
            cmd.append("--linger")
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        return proc

    def run(self, **kw: Any) -> dict[str, Any]:
        """A clean run to its end (the next process to start)."""
        return outcome(self.spawn(**kw))

    def release_barrier(self) -> None:
        Path(str(self.trace_path) + ".go").touch()

    def reset_barrier(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(self.trace_path) + ".go")

    # -- the trace --

    def lines(self) -> list[list[str]]:
        if not self.trace_path.exists():
            return []
        return [line.split() for line in self.trace_path.read_text().splitlines()]

    def paused(self, proc: subprocess.Popen[str]) -> bool:
        return any(p[0] == "pause" and p[2] == str(proc.pid) for p in self.lines())

    def saw(self, proc: subprocess.Popen[str], event: str) -> bool:
        return any(p[:3] == ["event", event, str(proc.pid)] for p in self.lines())

    def revision_activity(self) -> dict[str, tuple[int, int]]:
        """For each process: the first and last instant it was seen running revision code."""
        spans: dict[str, tuple[int, int]] = {}
        for parts in self.lines():
            if parts[0] not in ("begin", "did"):
                continue
            pid, at = parts[2], int(parts[3])
            first, last = spans.get(pid, (at, at))
            spans[pid] = (min(first, at), max(last, at))
        return spans

    def ran(self, rev: str, what: str) -> list[str]:
        """The processes that completed statement ``what`` of ``rev``."""
        return [p[2] for p in self.lines() if p[0] == "did" and p[1] == rev and p[4:] == [what]]

    # -- the database --

    def engine(self) -> Any:
        return create_engine(self.url)

    def heads(self) -> set[str]:
        from alembic.runtime.migration import MigrationContext

        engine = self.engine()
        try:
            with engine.connect() as conn:
                return set(MigrationContext.configure(conn).get_current_heads())
        finally:
            engine.dispose()

    def balances(self) -> dict[int, set[int]]:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT id, balance FROM accounts")).all()
        except Exception:
            if self.table_exists("accounts"):
                raise
            return {}
        finally:
            engine.dispose()
        found: dict[int, set[int]] = {}
        for ident, balance in rows:
            found.setdefault(ident % 3, set()).add(balance)
        return found

    def execute(self, sql: str) -> None:
        engine = self.engine()
        try:
            with engine.begin() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def table_exists(self, name: str) -> bool:
        from sqlalchemy import inspect

        engine = self.engine()
        try:
            with engine.connect() as conn:
                return bool(inspect(conn).has_table(name))
        finally:
            engine.dispose()

    # -- the lock --

    def held(self) -> list[str]:
        """Whatever any process holds of this namespace's lock, fence and designation, read
        from the servers themselves."""
        found: list[str] = []
        engine = self.engine()
        try:
            _, namespace, holders = lock_holders(engine, config=self.ini)
            found += [h.describe() for h in holders]
            if self.backend in ("postgresql", "redis"):
                with engine.connect() as conn:
                    count = conn.execute(
                        text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                            "granted AND database = (SELECT oid FROM pg_database "
                            "WHERE datname = current_database())"
                        )
                    ).scalar_one()
                found += [f"{count} advisory lock(s) in pg_locks"] if count else []
            if self.backend == "redis":
                client = redis.Redis.from_url(self.redis_server.url)
                try:
                    name = "lock:" + key_name(namespace)
                    found += [k for k in (name, name + ":waiter") if client.exists(k)]
                finally:
                    client.close()
            if self.backend == "mysql":
                with engine.connect() as conn:
                    for name in lock_names(namespace):
                        owner = conn.execute(
                            text("SELECT IS_USED_LOCK(:name)"), {"name": name}
                        ).scalar()
                        if owner is not None:
                            found.append(f"IS_USED_LOCK({name}) = {owner}")
        finally:
            engine.dispose()
            _state.reset()
        return found

    def sessions(self, role: str) -> list[int]:
        engine = self.engine()
        try:
            _, _, holders = lock_holders(engine, config=self.ini)
        finally:
            engine.dispose()
            _state.reset()
        return [int(h.session_id) for h in holders if h.role == role and h.session_id]

    def kill_session(self, session: int) -> None:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                if self.backend == "mysql":
                    conn.execute(text(f"KILL {int(session)}"))
                else:
                    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
                conn.commit()
        finally:
            engine.dispose()


def outcome(proc: subprocess.Popen[str], timeout: float = 90) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    found = [line for line in out.splitlines() if line.startswith("{")]
    data: dict[str, Any] = json.loads(found[-1]) if found else {}
    data["returncode"] = proc.returncode
    data["stderr"] = err[-3000:]
    return data


def lingering_outcome(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """The JSON line of a worker started with linger=True, while it is still alive."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            data = json.loads(line)
        if line.strip() == "lingering":
            return data
    raise AssertionError(f"the worker ended without lingering: {data}")


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    def make(backend: str, url: str | None = None) -> World:
        settings: dict[str, Any] = {"transaction": "all", "timeout": 20, "orphan_wait": 0.5}
        redis_server = None
        if url is None and backend == "mysql":
            url = str(request.getfixturevalue("mysql_url"))
        elif url is None and backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'app.db'}"
        elif url is None:
            url = str(request.getfixturevalue("pg_url"))
        if backend == "redis":
            redis_server = request.getfixturevalue("own_redis")
            settings.update(lock=redis_server.url, lock_ttl=2)
        ini = tmp_path / "alembic.ini"
        ini.write_text(
            "\n".join(
                [
                    "[alembic]",
                    f"script_location = {FAULTS_DIR}",
                    f"prepend_sys_path = {FAULTS_DIR}",
                    "path_separator = os",
                    f"sqlalchemy.url = {url.replace('%', '%%')}",
                    "",
                    "[alembic_autolock]",
                    *(f"{k} = {v}" for k, v in settings.items()),
                    "",
                ]
            )
        )
        made = World(backend, url, str(ini), tmp_path / "trace.log", redis_server)
        worlds.append(made)
        return made

    worlds: list[World] = []
    yield make
    for made in worlds:
        for proc in made.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                proc.wait()


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own, which it may restart."""
    with PrivatePostgres(tmp_path / "pg") as server:
        yield server


# --- the invariants ---------------------------------------------------------------------------


def assert_one_at_a_time(w: World) -> None:
    """No two processes ever ran revision code at the same time (from the trace)."""
    spans = sorted(w.revision_activity().items(), key=lambda item: item[1])
    for (pid_a, (_, end_a)), (pid_b, (start_b, _)) in itertools.pairwise(spans):
        assert end_a < start_b, (
            f"process {pid_a} ran revision code until {end_a}, after process {pid_b} began at "
            f"{start_b}:\n" + "\n".join(" ".join(p) for p in w.lines())
        )
    for batch in range(3):  # a batch committed twice is a double execution, whoever ran it
        assert len(w.ran("f2", f"batch{batch}")) <= 1, w.lines()


def assert_nothing_held(w: World) -> None:
    assert w.held() == []


def assert_truthful(w: World, result: dict[str, Any]) -> None:
    """A failure's description of the database matches the database."""
    if "error" not in result or result.get("state") is None:
        return
    heads = w.heads()
    state = str(result["state"])
    if state.startswith("unknown"):
        return
    described = (
        "revision " + ", ".join(sorted(heads)) if heads else "no revision (empty version table)"
    )
    assert f"at {described}" in state, (heads, result)
    if result.get("heads") is not None:
        assert set(result["heads"]) == heads, (heads, result)
    applied = set(result.get("applied") or ())
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(FAULTS_DIR))
    have = {r.revision for r in script.iterate_revisions(tuple(heads), "base")} if heads else set()
    assert applied <= have, (applied, heads, result)


def finish_the_job(w: World) -> dict[str, Any]:
    """The next run finishes the job, or refuses naming the revision left half-run; then the
    operator repairs it by hand, resolves, and the run after finishes."""
    nxt = w.run()
    for _ in range(3):
        if nxt.get("error") != "MigrationInterrupted":
            break
        revision = nxt["revision"]
        assert revision in ("f1", "f2", "f3"), nxt
        assert f"resolve {revision} --applied" in nxt["message"], nxt
        batches = w.balances()
        if revision == "f2" and any(values == {100} for values in batches.values()):
            # part of the backfill is committed: finish it by hand, then say it is applied
            for batch, values in batches.items():
                assert values in ({1}, {100}), values  # no batch ran twice
                if values == {1}:
                    w.execute(f"UPDATE accounts SET balance = balance * 100 WHERE id % 3 = {batch}")
            resolved = w.run(op="resolve-applied", rev="f2")
        elif revision == "f2":  # none of it is committed: let it run again
            resolved = w.run(op="resolve-not-applied", rev="f2")
        else:  # undo what it did, and let it run again
            w.execute(f"DROP TABLE IF EXISTS {'audit' if revision == 'f3' else 'accounts'}")
            resolved = w.run(op="resolve-not-applied", rev=revision)
        assert "error" not in resolved, resolved
        nxt = w.run()
    assert "error" not in nxt, nxt
    assert nxt["heads"] == [HEAD], nxt
    assert w.heads() == {HEAD}
    assert w.balances() == {0: {100}, 1: {100}, 2: {100}}, w.lines()
    return nxt


# --- one cell ---------------------------------------------------------------------------------

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigstop": signal.SIGSTOP}


def _wait_paused(w: World, proc: subprocess.Popen[str]) -> None:
    assert wait_for(lambda: w.paused(proc) or proc.poll() is not None, 60), w.lines()
    assert proc.poll() is None, outcome(proc)


def _bring_holder(
    w: World, phase: str, *, fail: str | None = None, linger: bool = False, url: str | None = None
) -> Any:
    """A holder paused at ``phase`` (on the barrier)."""
    kind, where = PHASES[phase]
    if kind == "pause":
        holder = w.spawn(pause=where, fail=fail, linger=linger, url=url)
    else:
        holder = w.spawn(fault=f"{where}=pause", fail=fail, linger=linger, url=url)
    _wait_paused(w, holder)
    return holder


def run_cell(w: World, phase: str, fault: str) -> None:
    if phase == "waiting":
        _waiting_cell(w, fault)
    elif fault in ("sigkill", "sigterm"):
        _signal_cell(w, phase, fault)
    elif fault == "sigstop":
        _frozen_cell(w, phase)
    elif fault == "raise":
        _raise_cell(w, phase)
    elif fault in NET_FAULTS:
        _net_cell(w, phase, fault)
    elif fault == "db-restart":
        _restart_cell(w, phase)
    elif fault == "statement-timeout":
        _statement_timeout_cell(w, phase)
    else:
        _server_cell(w, phase, fault)
    assert_one_at_a_time(w)
    finish_the_job(w)
    assert_one_at_a_time(w)
    assert_nothing_held(w)


def _waiting_cell(w: World, fault: str) -> None:
    """The fault hits a waiter; the holder finishes; the waiter leaves nothing behind."""
    holder = _bring_holder(w, "revision")
    action = fault.upper()
    waiter = w.spawn(fault=f"lock.waiting={action}", linger=fault == "sigterm")
    assert wait_for(lambda: w.saw(waiter, "lock.waiting"), 60), w.lines()
    if fault == "sigstop":
        assert wait_for(lambda: _stopped(waiter.pid), 10)
    if fault == "sigterm":
        got = lingering_outcome(waiter)
        assert got["error"] == "SystemExit", got
        assert got["process_lock_held"] == [], got
        held = w.held()  # the holder's lock and fence only
        assert not any(str(waiter.pid) in h for h in held), held
        waiter.communicate("\n", timeout=30)
    w.release_barrier()
    done = outcome(holder)
    assert "error" not in done and done["heads"] == [HEAD], done
    if fault == "sigstop":
        os.kill(waiter.pid, signal.SIGCONT)
        got = outcome(waiter)
        assert "error" not in got and got["heads"] == [HEAD], got
    elif fault == "sigkill":
        got = outcome(waiter)
        assert got["returncode"] == -signal.SIGKILL, got
        if w.backend == "redis":  # a killed designated waiter's key expires (3 s) by itself
            assert wait_for(lambda: w.held() == [], 10), w.held()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


def _signal_cell(w: World, phase: str, fault: str) -> None:
    kind, where = PHASES[phase]
    sig = SIGNALS[fault]
    linger = fault == "sigterm"
    if kind == "event":
        holder = w.spawn(fault=f"{where}={fault.upper()}", linger=linger)
    else:
        holder = _bring_holder(w, phase, linger=linger)
        os.kill(holder.pid, sig)
    if fault == "sigkill":
        got = outcome(holder)
        assert got["returncode"] == -signal.SIGKILL, got
        if w.backend == "redis":  # the key outlives a killed holder, by lock_ttl at most
            assert wait_for(lambda: w.held() == [], 10), w.held()
        return
    got = lingering_outcome(holder)
    # SystemExit went through: the process holds nothing, though it is still alive
    assert got["error"] == "SystemExit", got
    assert got["process_lock_held"] == [], got
    assert w.held() == [], got
    holder.communicate("\n", timeout=30)


def _frozen_cell(w: World, phase: str) -> None:
    """Frozen: a session lock stays held (the next run times out naming the holder); a Redis
    key expires, the next holder ends the frozen one's migration session, and the frozen one,
    woken, fails as LockLost without running another statement."""
    holder = _bring_holder(w, phase)
    os.kill(holder.pid, signal.SIGSTOP)
    w.release_barrier()  # seen only once it is woken
    if w.backend == "redis":
        client = redis.Redis.from_url(w.redis_server.url)
        try:
            assert wait_for(lambda: not client.keys("lock:alembic_autolock:*"), 10)
        finally:
            client.close()
        nxt = w.run()
        assert nxt.get("error") in (None, "MigrationInterrupted"), nxt
        os.kill(holder.pid, signal.SIGCONT)
        got = outcome(holder)
        if phase == "acquired" and "error" not in got:
            pytest.fail(f"a holder whose lock expired before its second look migrated: {got}")
        assert got["error"] == "LockLost", got
        return
    nxt = w.run(timeout=2)
    if "error" in nxt or w.backend == "postgresql":
        assert nxt["error"] == "LockTimeout", nxt
        assert f"{holder.pid}" in nxt["message"], nxt
    else:  # MySQL, SQLite: each revision commits on its own; frozen after the last one
        assert phase == "last" and nxt["heads"] == [HEAD], nxt
    os.kill(holder.pid, signal.SIGCONT)
    got = outcome(holder)
    assert "error" not in got and got["heads"] == [HEAD], got


def _raise_cell(w: World, phase: str) -> None:
    """A revision raises: MigrationFailed naming it, and a state that is the database's."""
    failing = {"revision": "f1", "batches": "f2", "last": "f3"}[phase]
    got = w.run(fail=failing)
    assert got["error"] == "MigrationFailed", got
    assert got["revision"] == failing, got
    assert_truthful(w, got)


def _server_cell(w: World, phase: str, fault: str) -> None:
    holder = _bring_holder(w, phase)
    if fault == "unlock":
        code = cli_main(["-c", w.ini, "unlock", "--force", "--yes"])
        _state.reset()
        if w.backend == "sqlite":
            assert code == 2  # refused: the kernel releases a file lock, not an operator
            w.release_barrier()
            got = outcome(holder)
            assert "error" not in got, got
            return
        assert code == 0
    elif fault == "kill-lock":
        sessions = w.sessions("lock")
        assert len(sessions) == 1, sessions
        w.kill_session(sessions[0])
    elif fault == "kill-migration":
        sessions = w.sessions("fence")
        assert len(sessions) == 1, sessions
        w.kill_session(sessions[0])
    elif fault == "redis-restart":
        w.redis_server.restart()
    w.release_barrier()
    got = outcome(holder)
    heads_after = w.heads()
    if "error" not in got:
        # Nothing was left to run after the fault (each revision commits on its own on
        # MySQL), or a holder whose lock session or Redis key went while its migration session
        # (the fence) stayed resumed within CHECK_EVERY of its last check, or past its last
        # revision: it finished under the fence, which no other process could have passed
        # meanwhile. What it reports must then be the database; before the second look a lost
        # lock always stops the run.
        assert phase != "acquired", got
        assert fault in ("kill-lock", "kill-migration", "redis-restart", "unlock"), got
        assert got["heads"] == [HEAD] and w.heads() == {HEAD}, got
    elif fault == "kill-migration":
        # the lock was never lost: the run failed because its session was ended under it
        assert got["error"] in ("MigrationFailed",), got
    else:
        assert got["error"] == "LockLost", got
    assert_truthful(w, got)
    assert w.heads() == heads_after
    backfilled = any(p[:3] == ["did", "f2", str(holder.pid)] for p in w.lines())
    if got.get("error") == "LockLost" and w.backend != "mysql" and not backfilled:
        # nothing that a transaction could not undo ran: the next run has nothing to refuse
        nxt = w.run()
        assert nxt.get("error") != "MigrationInterrupted", nxt


def _relayed(w: World, relay: Relay) -> str:
    """The world's URL, through the relay."""
    return (
        make_url(w.url).set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    )


def _net_cell(w: World, phase: str, fault: str) -> None:
    """The holder reaches PostgreSQL through a relay the test owns. Cut: every connection of
    the holder closes at once; it fails, typed, and its sessions (its lock and fence) end with
    them on the server. Stalled: nothing reaches the server and nothing is closed, so the
    server still sees the holder's sessions, its lock and its fence: a run beside it (not
    through the relay) times out naming it. Resumed, the holder finishes; cut, it fails."""
    target = make_url(w.url)
    relay = Relay(target.host or "127.0.0.1", target.port or 5432)
    try:
        holder = _bring_holder(w, phase, url=_relayed(w, relay))
        if fault == "net-cut":
            relay.cut()
            w.release_barrier()
            got = outcome(holder)
        else:
            relay.stall()
            w.release_barrier()  # the holder's next statement waits in the stalled relay
            nxt = w.run(timeout=2)
            assert nxt.get("error") == "LockTimeout", nxt
            assert f"{holder.pid}" in nxt["message"], nxt
            assert holder.poll() is None, outcome(holder)
            if fault == "net-stall":
                relay.resume()
                got = outcome(holder)
                assert "error" not in got and got["heads"] == [HEAD], got
                return
            relay.cut()  # the connections reset, and the network is back
            relay.resume()
            got = outcome(holder)
    finally:
        relay.close()
    # every session went at once, its lock with it: that is what it says, wherever it stood
    assert got.get("error") == "LockLost", got
    assert_truthful(w, got)
    assert wait_for(lambda: w.held() == [], 10), w.held()


def _restart_cell(w: World, phase: str) -> None:
    """The database server restarts (fast: it ends every session) under a paused holder."""
    holder = _bring_holder(w, phase)
    w.private_pg.restart("fast")
    w.release_barrier()
    got = outcome(holder)
    # every session went at once, its lock with it: that is what it says, wherever it stood
    assert got.get("error") == "LockLost", got
    assert_truthful(w, got)


def _statement_timeout_cell(w: World, phase: str) -> None:
    """A statement of a revision runs past the statement_timeout env.py's connection_setup
    set on the migration connection: MigrationFailed naming the revision, the state the
    database's; the next run (without the slow statement) finishes or refuses naming it."""
    slow = SLOW[phase]
    got = w.run(env_extra={"AUTOLOCK_FAULT_SLOW": slow, "AUTOLOCK_FAULT_STATEMENT_TIMEOUT": "300"})
    assert got.get("error") == "MigrationFailed", got
    assert got["revision"] == slow.split(":")[0], got
    assert "statement timeout" in got["message"], got
    assert not w.ran(slow.split(":")[0], "slow"), w.lines()
    assert_truthful(w, got)


@pytest.mark.parametrize(
    ("backend", "phase", "fault"), [pytest.param(*case, id="-".join(case)) for case in CASES]
)
def test_fault(
    world: Any, request: pytest.FixtureRequest, backend: str, phase: str, fault: str
) -> None:
    """One cell of the matrix: at most one process runs revision code, the error is the
    truth, nothing stays held, the next run finishes or refuses naming the revision."""
    if fault == "db-restart":  # a server of the test's own: never restart the shared one
        pg = request.getfixturevalue("private_pg")
        w = world(backend, url=pg.url(pg.create_database("app")))
        w.private_pg = pg
    else:
        w = world(backend)
    run_cell(w, phase, fault)


# --- soak --------------------------------------------------------------------------------------

SOAK = int(os.environ.get("AUTOLOCK_SOAK", "0") or 0)


# Defined only when asked for: a skipped test fails a CI run (tests/conftest.py), and the soak
# is an on-demand size, not a CI one.
if SOAK:

    @pytest.mark.parametrize("backend", ["postgresql", "redis", "mysql"])
    def test_soak(world: Any, backend: str) -> None:
        """N rounds: a fleet of 6 starts on an empty database; one of them, at random, is killed,
        terminated or frozen at a random point; never two migrators, and the fleet plus one more
        run always ends at head (or refuses naming f2, which is then resolved)."""
        rng = random.Random(int(os.environ.get("AUTOLOCK_SOAK_SEED", "0") or time.time_ns()))
        for round_ in range(SOAK):
            w = world(backend)
            w.trace_path = w.trace_path.with_name(f"trace-{round_}.log")
            w.reset_barrier()
            if round_:
                for table in ("audit", "accounts", "alembic_version", "alembic_autolock_journal"):
                    w.execute(f"DROP TABLE IF EXISTS {table}")
            events = [
                "lock.acquired",
                "migration.started",
                "migration.step:f1",
                "migration.step:f2",
            ]
            fault = f"{rng.choice(events)}={rng.choice(['SIGKILL', 'SIGTERM', 'SIGSTOP'])}"
            victim = w.spawn(fault=fault)
            fleet = [w.spawn(timeout=4) for _ in range(5)]
            for proc in fleet:
                got = outcome(proc)
                assert got.get("error") in (None, "MigrationInterrupted", "LockTimeout"), got
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGCONT)
            outcome(victim)
            assert_one_at_a_time(w)
            finish_the_job(w)
            assert_nothing_held(w)


# --- a lost holder on its way ------------------------------------------------------------------


def test_lost_holder_never_ends_the_successors_migration(world: Any) -> None:
    """A holder that lost its (Redis) lock while it waited for an orphan's fence must not, when
    it resumes, end the session that holds the fence by then: that is its successor's
    migration. It fails as LockLost; the successor finishes undisturbed."""
    w = world("redis")
    client = redis.Redis.from_url(w.redis_server.url)

    def key_gone() -> bool:
        return not client.keys("lock:alembic_autolock:*")

    try:
        orphan = _bring_holder(w, "revision")  # holds the fence: its session is the orphan
        os.kill(orphan.pid, signal.SIGSTOP)
        assert wait_for(key_gone, 10)
        # takes the lock, finds the orphan's fence, and is frozen while it waits for it
        lost = w.spawn(fault="orphan.waiting=SIGSTOP")
        assert wait_for(lambda: w.saw(lost, "orphan.waiting"), 60), w.lines()
        assert wait_for(lambda: _stopped(lost.pid), 10)
        assert wait_for(key_gone, 10)
        # the successor ends the orphan's session and migrates; it pauses inside f1
        successor = w.spawn(pause="f1:body")
        assert wait_for(lambda: w.paused(successor) or successor.poll() is not None, 60)
        assert successor.poll() is None, outcome(successor)
        os.kill(lost.pid, signal.SIGCONT)
        resumed = outcome(lost)
        w.release_barrier()
        done = outcome(successor)
        os.kill(orphan.pid, signal.SIGCONT)
        orphaned = outcome(orphan)
    finally:
        client.close()
    assert resumed["error"] == "LockLost", resumed
    assert "error" not in done and done["heads"] == [HEAD], done
    assert orphaned["error"] in ("LockLost", "MigrationFailed"), orphaned
    assert_one_at_a_time(w)
    assert w.balances() == {0: {100}, 1: {100}, 2: {100}}
    assert_nothing_held(w)
