"""The Redis and MySQL/MariaDB backends, lost locks, dead holders, orphaned migration sessions,
holders and unlock: real Redis, real MariaDB, real PostgreSQL, real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from structlog.testing import capture_logs
from support import (
    ALL_REVS,
    DATABASE_KINDS,
    PG_DRIVERS,
    database_url,
    finish,
    heads_of,
    holder_hanging_in,
    stampede,
    start_worker,
    wait_for,
    worker_env,
)

from alembic_autolock import (
    ConfigError,
    LockTimeout,
    LockUnavailable,
    MigrationFailed,
    MigrationInterrupted,
    ensure_migrated,
    status,
    upgrade,
)
from alembic_autolock._plan import derive_namespace
from alembic_autolock._runner import lock_holders, resolve, unlock
from alembic_autolock._settings import Settings
from alembic_autolock.cli import main
from alembic_autolock.locks.mysql import lock_name
from alembic_autolock.locks.redis import key_name


@pytest.fixture
def redis_ns(redis_url: str) -> Iterator[str]:
    """A namespace of this test's own on the shared Redis; its keys are deleted afterwards."""
    namespace = f"test-{uuid.uuid4().hex}"
    yield namespace
    client = redis.Redis.from_url(redis_url)
    key = key_name(namespace)
    client.delete(f"lock:{key}", f"lock-signal:{key}")
    client.close()


@pytest.fixture(params=["redis", "mysql"])
def target(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """(database URL, settings) for the Redis backend (on PostgreSQL) and for MariaDB."""
    if request.param == "redis":
        url = request.getfixturevalue("pg_url")
        ns = request.getfixturevalue("redis_ns")
        return url, {"lock": request.getfixturevalue("redis_url"), "namespace": ns, "lock_ttl": 2}
    return request.getfixturevalue("mysql_url"), {}


def test_stampede_is_exactly_once(
    target: tuple[str, dict[str, Any]], make_ini: Any, trace: Any
) -> None:
    """20 processes released at once: each revision body runs once, every process succeeds."""
    url, settings = target
    ini = make_ini(url, **settings)
    outcomes = stampede(20, ini, url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.05"))
    assert [o.returncode for o in outcomes] == [0] * 20, [o.data for o in outcomes]
    assert trace.bodies() == ALL_REVS
    assert Counter(o.data["action"] for o in outcomes)["upgraded"] == 1
    assert Counter(r for o in outcomes for r in o.data["applied"]) == Counter(ALL_REVS)
    assert heads_of(url) == {"r5"}


def test_sigkilled_holder_is_replaced_within_bound(
    target: tuple[str, dict[str, Any]], make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A holder SIGKILLed inside r3: the next process proceeds (at once on MySQL, within
    lock_ttl on Redis). On PostgreSQL r3 ran in a transaction, so the next run finishes from
    the last committed revision; on MySQL r3 ran outside one, so the next run refuses to re-run
    it blindly until it is resolved."""
    url, settings = target
    ini = make_ini(url, transaction="per-migration", **settings)
    with holder_hanging_in(ini, url, trace, "r3") as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    engine = make_engine(url)
    bound = settings.get("lock_ttl", 0) + 2 if "lock" in settings else 5
    if "lock" not in settings:  # MySQL
        started = time.monotonic()
        with pytest.raises(MigrationInterrupted) as info:
            ensure_migrated(engine, config=ini, timeout=10)
        assert time.monotonic() - started < bound
        assert (info.value.revision, info.value.failed) == ("r3", False)
        assert f"pid {proc.pid} on " in info.value.holder
        assert heads_of(url) == {"r2"}
        resolve(engine, "r3", applied=False, config=ini)  # r3 hung before any DDL
    result = ensure_migrated(engine, config=ini, timeout=10)
    assert result.waited_s < bound
    assert result.applied == ("r3", "r4", "r5")


def test_sub_second_timeout_is_honoured(
    target: tuple[str, dict[str, Any]], make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """timeout=0.3 waits about 0.3 s (python-redis-lock alone would wait forever)."""
    url, settings = target
    ini = make_ini(url, **settings)
    with holder_hanging_in(ini, url, trace, "r1"), pytest.raises(LockTimeout) as info:
        ensure_migrated(make_engine(url), config=ini, timeout=0.3)
    assert 0.3 <= info.value.waited_s < 1.5
    assert [h.waiting for h in info.value.holders][:1] == [False]


def test_redis_wait_longer_than_socket_timeout(
    pg_url: str, redis_url: str, redis_ns: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A waiter that waits 7 s (past redis-py 8's default 5 s socket timeout) gets the lock
    when the holder finishes, instead of a TimeoutError."""
    ini = make_ini(pg_url, lock=redis_url, namespace=redis_ns)
    proc = start_worker(
        ini, pg_url, env=worker_env(AUTOLOCK_TEST_SLEEP="1.5", AUTOLOCK_TEST_TRACE=str(trace.path))
    )
    assert wait_for(lambda: trace.bodies() != [], 30)
    result = ensure_migrated(make_engine(pg_url), config=ini, timeout=20)
    assert finish(proc).returncode == 0
    assert result.action == "current"
    assert result.waited_s > 5


def test_redis_keys_are_namespaced_with_a_hash_tag(
    pg_url: str, redis_url: str, redis_ns: str, make_ini: Any, trace: Any
) -> None:
    """The lock key is lock:alembic_autolock:{<hash>} and its value names host, pid, program."""
    ini = make_ini(pg_url, lock=redis_url, namespace=redis_ns, lock_ttl=5)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with holder_hanging_in(ini, pg_url, trace, "r1") as proc:
        key = f"lock:{key_name(redis_ns)}"
        assert key.startswith("lock:alembic_autolock:{") and key.endswith("}")
        owner = client.get(key)
        assert owner is not None and f":{proc.pid}:worker.py:" in owner
        assert 0 < client.ttl(key) <= 5
        assert client.keys("lock:*" + redis_ns + "*") == []  # the namespace is hashed
    client.close()


def test_redis_expiry_while_held_gives_lock_lost(
    pg_url: str, redis_url: str, redis_ns: str, make_ini: Any, trace: Any
) -> None:
    """The holder is frozen (SIGSTOP: no renewal) past lock_ttl: when it resumes it finishes
    the revision in progress and stops with LockLost before the next one."""
    ini = make_ini(
        pg_url, lock=redis_url, namespace=redis_ns, lock_ttl=2, transaction="per-migration"
    )
    proc = start_worker(
        ini, pg_url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.5", AUTOLOCK_TEST_TRACE=str(trace.path))
    )
    assert wait_for(lambda: "r2" in trace.bodies(), 30)
    os.kill(proc.pid, signal.SIGSTOP)
    client = redis.Redis.from_url(redis_url)
    try:
        assert wait_for(lambda: client.get(f"lock:{key_name(redis_ns)}") is None, 10)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        client.close()
    outcome = finish(proc)
    assert outcome.returncode == 1
    assert outcome.data["error"] == "LockLost"
    assert (outcome.data["revision"], outcome.data["applied"]) == ("r3", ["r1", "r2"])
    assert trace.bodies() == ["r1", "r2"]
    assert heads_of(pg_url) == {"r2"}


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_lock_lost_in_one_transaction_reports_everything_rolled_back(
    pg_url: str, redis_url: str, redis_ns: str, make_ini: Any, trace: Any
) -> None:
    """transaction = all: LockLost before r3 rolls back r1 and r2 with the rest, and the error
    says so (it used to list them as applied)."""
    ini = make_ini(pg_url, lock=redis_url, namespace=redis_ns, lock_ttl=2, transaction="all")
    proc = start_worker(
        ini, pg_url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.5", AUTOLOCK_TEST_TRACE=str(trace.path))
    )
    assert wait_for(lambda: "r2" in trace.bodies(), 30)
    os.kill(proc.pid, signal.SIGSTOP)
    client = redis.Redis.from_url(redis_url)
    try:
        assert wait_for(lambda: client.get(f"lock:{key_name(redis_ns)}") is None, 10)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        client.close()
    outcome = finish(proc)
    assert (outcome.data["error"], outcome.data["revision"]) == ("LockLost", "r3")
    assert outcome.data["applied"] == []
    assert "database unchanged at no revision" in outcome.data["message"]
    assert "was rolled back" in outcome.data["message"]
    assert heads_of(pg_url) == set()


@pytest.mark.parametrize("kind", DATABASE_KINDS)
def test_dropped_lock_connection_gives_lock_lost(
    kind: str, request: pytest.FixtureRequest, make_ini: Any, trace: Any
) -> None:
    """The database ends the holder's lock session: the holder stops before the next
    revision with LockLost."""
    url = database_url(request, kind)
    ini = make_ini(url, transaction="per-migration")
    proc = start_worker(
        ini, url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.5", AUTOLOCK_TEST_TRACE=str(trace.path))
    )
    assert wait_for(lambda: "r2" in trace.bodies(), 30)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if kind != "mysql":
            ended = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'autolock:lock:%' AND datname = current_database()"
                )
            ).all()
        else:
            ns = derive_namespace(Settings(), admin)
            holder = conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": lock_name(ns)}).scalar()
            conn.execute(text(f"KILL {int(holder)}"))
            ended = [holder]
    admin.dispose()
    assert len(ended) == 1
    outcome = finish(proc)
    assert outcome.data["error"] == "LockLost"
    assert outcome.data["revision"] == "r3"
    assert heads_of(url) == {"r2"}


def test_redis_unreachable_fails_closed(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """No Redis: a clear LockUnavailable, and nothing applied without the lock."""
    ini = make_ini(pg_url, lock="redis://:pw123@127.0.0.1:1/0")
    with pytest.raises(LockUnavailable) as info:
        ensure_migrated(make_engine(pg_url), config=ini)
    assert "redis://:***@127.0.0.1:1/0" in str(info.value)
    assert "pw123" not in str(info.value)
    assert trace.bodies() == []
    assert heads_of(pg_url) == set()


def test_redis_restart_while_holding_stops_before_next_revision(
    pg_url: str, make_ini: Any, trace: Any, own_redis: Any
) -> None:
    """Redis restarts (losing every key) while a holder migrates: it stops before the next
    revision with LockLost; nothing beyond the revision in progress was applied."""
    ini = make_ini(
        pg_url,
        lock=own_redis.url,
        namespace="restart-test",
        lock_ttl=5,
        transaction="per-migration",
    )
    proc = start_worker(
        ini, pg_url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.7", AUTOLOCK_TEST_TRACE=str(trace.path))
    )
    assert wait_for(lambda: "r2" in trace.bodies(), 30)
    own_redis.restart()
    outcome = finish(proc)
    assert outcome.data["error"] == "LockLost"
    assert outcome.data["revision"] == "r3"
    assert trace.bodies() == ["r1", "r2"]
    assert heads_of(pg_url) == {"r2"}


def test_redis_down_while_waiting_fails_closed(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any, own_redis: Any
) -> None:
    """Redis goes away while a process waits for the lock: LockUnavailable, nothing applied
    by the waiter."""
    ini = make_ini(pg_url, lock=own_redis.url, namespace="down-test", lock_ttl=5)
    with holder_hanging_in(ini, pg_url, trace, "r1"):
        waiter = start_worker(
            ini,
            pg_url,
            "--setting",
            "timeout=20",
            env=worker_env(AUTOLOCK_TEST_TRACE=str(trace.path)),
        )
        time.sleep(0.5)
        own_redis.stop()
        outcome = finish(waiter)
    assert outcome.data["error"] == "LockUnavailable"
    assert trace.bodies() == ["r1"]


def test_mysql_failure_is_journalled_and_refused_next_time(
    mysql_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MySQL has no transactional DDL: the error says the failed revision's work is committed,
    and the next run refuses to re-run it until an operator resolves it."""
    engine = make_engine(mysql_url)
    ini = make_ini(mysql_url)
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r2")
    with pytest.raises(MigrationFailed) as info:
        ensure_migrated(engine, config=ini)
    err = info.value
    assert (err.revision, err.applied, err.heads) == ("r2", ("r1",), ("r1",))
    assert err.state.startswith("database at revision r1; r2 ran outside a transaction")
    monkeypatch.delenv("AUTOLOCK_TEST_FAIL_AT")
    with pytest.raises(MigrationInterrupted) as refused:
        ensure_migrated(engine, config=ini)
    assert (refused.value.revision, refused.value.failed) == ("r2", True)
    assert "RuntimeError: revision r2 failed on purpose" in str(refused.value)
    # its CREATE TABLE t2 committed: the operator completes it by hand and says it is applied
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t2 (id, note) VALUES (1, 'r2')"))
    assert main(["-c", ini, "resolve", "r2", "--applied"]) == 0
    assert heads_of(mysql_url) == {"r2"}
    result = ensure_migrated(engine, config=ini)
    assert result.applied == ("r3", "r4", "r5")


@pytest.mark.parametrize("kind", DATABASE_KINDS)
def test_orphaned_migration_session_is_waited_for_then_ended(
    kind: str, request: pytest.FixtureRequest, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A holder killed while its migration session runs a long statement: the next holder
    does not migrate beside it; with orphan_wait = 0 it terminates it, with an event."""
    url = database_url(request, kind)
    ini = make_ini(url, transaction="per-migration")
    # MySQL commits DDL at once, so there the sleep comes before the revision's DDL
    where = "r3" if kind != "mysql" else "r3:before"
    proc = start_worker(
        ini,
        url,
        env=worker_env(AUTOLOCK_TEST_SERVER_SLEEP_AT=where, AUTOLOCK_TEST_TRACE=str(trace.path)),
    )
    assert wait_for(lambda: ["r3", "up", str(proc.pid), "server-sleep"] in trace.lines(), 30)
    time.sleep(0.2)  # the statement is running in the server
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    engine = make_engine(url)
    with capture_logs() as logs:
        if kind == "mysql":  # r3 was cut short outside a transaction: not re-run blindly
            with pytest.raises(MigrationInterrupted):
                ensure_migrated(engine, config=ini, orphan_wait=0, timeout=10)
            resolve(engine, "r3", applied=False, config=ini)
        result = ensure_migrated(engine, config=ini, orphan_wait=0, timeout=10)
    assert result.applied == ("r3", "r4", "r5")
    orphan_events = [e["event"] for e in logs if e["event"].startswith("orphan.")]
    assert orphan_events == ["orphan.waiting", "orphan.terminated"]


def test_orphaned_session_that_ends_by_itself_is_waited_for(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """On PostgreSQL 14+ the orphan notices its dead client within a second
    (client_connection_check_interval); the next holder waits for it to end."""
    ini = make_ini(pg_url, transaction="per-migration")
    proc = start_worker(
        ini,
        pg_url,
        env=worker_env(AUTOLOCK_TEST_SERVER_SLEEP_AT="r3", AUTOLOCK_TEST_TRACE=str(trace.path)),
    )
    assert wait_for(lambda: ["r3", "up", str(proc.pid), "server-sleep"] in trace.lines(), 30)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with capture_logs() as logs:
        result = ensure_migrated(make_engine(pg_url), config=ini, orphan_wait=20, timeout=10)
    assert result.applied == ("r3", "r4", "r5")
    orphan_events = [e["event"] for e in logs if e["event"].startswith("orphan.")]
    assert orphan_events == ["orphan.waiting", "orphan.gone"]


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_holders_show_holder_and_waiters(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`holders` names the holding session, the holder's migration session (the fence) and the
    designated waiter (PostgreSQL)."""
    ini = make_ini(pg_url)
    waiter = None
    with holder_hanging_in(ini, pg_url, trace, "r1") as holder:
        waiter = start_worker(ini, pg_url, "--setting", "timeout=30")
        engine = make_engine(pg_url)
        assert wait_for(lambda: len(lock_holders(engine, config=ini)[2]) == 3, 20)
        backend, _, found = lock_holders(engine, config=ini)
        assert backend == "postgresql"
        assert [
            (h.role, h.waiting, f":{p}:" in (h.owner or ""))
            for h, p in zip(found, (holder.pid, holder.pid, waiter.pid), strict=True)
        ] == [("lock", False, True), ("fence", False, True), ("wait", True, True)]
        assert found[1].owner.startswith("autolock:migrate:")
        assert main(["-c", ini, "holders"]) == 0
        out = capsys.readouterr().out
        assert "held by: pid" in out
        assert "migrating: pid" in out
        assert "waiting: pid" in out
        assert status(engine, config=ini).holders == found
        waiter.kill()
        waiter.wait()


def test_unlock_redis_checks_the_owner_unless_forced(
    pg_url: str,
    redis_url: str,
    redis_ns: str,
    make_ini: Any,
    make_engine: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """unlock deletes this namespace's Redis key only for the right --owner, or with --force;
    another namespace's key is never touched."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    other_ns = redis_ns + "-other"
    key, other = f"lock:{key_name(redis_ns)}", f"lock:{key_name(other_ns)}"
    client.set(key, "deadhost:123:app:abcd", ex=300)
    client.set(other, "someone:1:x:y", ex=300)
    ini = make_ini(pg_url, lock=redis_url, namespace=redis_ns)
    engine = make_engine(pg_url)
    try:
        with pytest.raises(ConfigError, match="pass --owner deadhost:123:app:abcd"):
            unlock(engine, config=ini)
        with pytest.raises(ConfigError, match="not by wrong; nothing deleted"):
            unlock(engine, config=ini, owner="wrong")
        assert client.get(key) == "deadhost:123:app:abcd"
        assert main(["-c", ini, "unlock", "--owner", "deadhost:123:app:abcd"]) == 0
        assert "cleared: owner 'deadhost:123:app:abcd'" in capsys.readouterr().out
        assert client.get(key) is None
        client.set(key, "other:1:app:zz", ex=300)
        assert main(["-c", ini, "unlock", "--force"]) == 2  # no terminal and no --yes
        assert "pass --yes with --force" in capsys.readouterr().err
        assert main(["-c", ini, "unlock", "--force", "--yes"]) == 0
        assert client.get(key) is None
        assert client.get(other) == "someone:1:x:y"
    finally:
        client.delete(other, key)
        client.close()


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_unlock_database_lock_needs_force(
    kind: str,
    request: pytest.FixtureRequest,
    make_ini: Any,
    make_engine: Any,
    trace: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """PostgreSQL/MySQL: unlock without --force refuses and names the holder; with --force
    --yes it ends the holding session, and the next process migrates."""
    url = request.getfixturevalue("pg_url" if kind == "postgresql" else "mysql_url")
    ini = make_ini(url)
    with holder_hanging_in(ini, url, trace, "r1"):
        assert main(["-c", ini, "unlock"]) == 2
        err = capsys.readouterr().err
        assert "pass --force" in err
        assert main(["-c", ini, "unlock", "--force", "--yes"]) == 0
        assert "cleared:" in capsys.readouterr().out
        # --force ended the holder's lock and migration sessions
        engine = make_engine(url)
        if kind == "mysql":  # r1 was cut short outside a transaction: not re-run blindly
            with pytest.raises(MigrationInterrupted):
                ensure_migrated(engine, config=ini, timeout=5, orphan_wait=0.5)
            resolve(engine, "r1", applied=False, config=ini)
        result = ensure_migrated(engine, config=ini, timeout=5, orphan_wait=0.5)
        assert result.action == "upgraded"


def test_application_redis_lock_still_works_after_ours(
    pg_url: str, redis_url: str, redis_ns: str, make_ini: Any
) -> None:
    """python-redis-lock registers its scripts once per process, on the first class used: our
    use of it must leave the application's own redis_lock.Lock working."""
    ini = make_ini(pg_url, lock=redis_url, namespace=redis_ns)
    code = (
        "import redis, redis_lock\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated\n"
        f"ensure_migrated(create_engine({pg_url!r}), config={ini!r})\n"
        f"client = redis.Redis.from_url({redis_url!r})\n"
        f"lock = redis_lock.Lock(client, {redis_ns + '-app'!r}, expire=5)\n"
        "assert lock.acquire(blocking=False)\n"
        "lock.release()\n"
        "print('app lock ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "app lock ok"


def test_lock_none_never_terminates_another_migrator(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """With lock = none another process may be migrating right now: its session is not an
    orphan, and is left alone."""
    ini = make_ini(pg_url, lock="none", transaction="per-migration")
    proc = start_worker(
        ini,
        pg_url,
        env=worker_env(AUTOLOCK_TEST_SERVER_SLEEP_AT="r5", AUTOLOCK_TEST_TRACE=str(trace.path)),
    )
    try:
        assert wait_for(lambda: ["r5", "up", str(proc.pid), "server-sleep"] in trace.lines(), 30)
        with capture_logs() as logs:
            result = upgrade(make_engine(pg_url), "r4", config=ini, orphan_wait=0)
        assert result.action == "current"
        assert [e for e in logs if e["event"].startswith("orphan.")] == []
        assert proc.poll() is None  # still migrating: its session was not terminated
    finally:
        proc.kill()
        proc.wait()


def test_holders_on_mysql_and_redis(
    target: tuple[str, dict[str, Any]],
    make_ini: Any,
    make_engine: Any,
    trace: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`holders --json` names the MySQL holder (connection, process, host, since, user, client)
    and a waiter blocked in GET_LOCK; for Redis the owner id (host:pid:program) and the
    remaining TTL."""
    url, settings = target
    ini = make_ini(url, **{**settings, "lock_ttl": 30} if settings else {})
    waiter = None
    with holder_hanging_in(ini, url, trace, "r1") as holder:
        if not settings:  # MySQL: a waiter shows in PROCESSLIST while it waits
            waiter = start_worker(ini, url, "--setting", "timeout=30")
            engine = make_engine(url)
            assert wait_for(lambda: len(lock_holders(engine, config=ini)[2]) == 3, 20)
        assert main(["-c", ini, "holders", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        if waiter is not None:
            waiter.kill()
            waiter.wait()
    held = [h for h in doc["holders"] if h["role"] == "lock"]
    assert len(held) == 1
    fence = [h for h in doc["holders"] if h["role"] == "fence"]
    assert len(fence) == 1  # the holder's migration session, in the database
    if settings:
        assert doc["backend"] == "redis"
        assert f":{holder.pid}:worker.py:" in held[0]["owner"]
        assert 0 < held[0]["ttl_s"] <= 30
    else:
        assert doc["backend"] == "mysql"
        assert held[0]["session"].startswith("connection ")
        assert held[0]["session"].endswith(f", process {holder.pid} on {socket.gethostname()}")
        assert held[0]["since"] is not None and not held[0]["since_is_last_activity"]
        assert (held[0]["owner"], held[0]["client"].split(":")[0]) == ("root", "127.0.0.1")
        assert [(h["role"], h["waiting"]) for h in doc["holders"]] == [
            ("lock", False),
            ("fence", False),
            ("wait", True),
        ]


@pytest.mark.parametrize("kind", DATABASE_KINDS)
def test_a_detached_lock_connection_is_closed_at_once(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The library's own connections are detached from their pool; closing one ends its
    server session at once (invalidating alone left it to the garbage collector, and a waiter
    held a session it no longer used)."""
    from sqlalchemy.pool import NullPool

    from alembic_autolock.locks._session import close, side_engine_for

    url = database_url(request, kind)
    engine = create_engine(url, poolclass=NullPool)
    conn = side_engine_for(engine).connect()
    conn.detach()
    raw = conn.connection.dbapi_connection
    close(conn)
    closed = raw.closed if kind != "mysql" else not raw.open
    engine.dispose()
    assert closed
