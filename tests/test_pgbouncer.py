"""Behind a real PgBouncer in transaction pooling mode (Debian's ``pgbouncer``, started here).

The app and the migrations go through PgBouncer; with ``lock_url`` the lock connection goes to
PostgreSQL directly (or through a session-mode pool) and a stampede is exactly-once. Without
``lock_url`` the session advisory lock lands on a server session that PgBouncer shares between
clients; the library must notice that and refuse, never run a revision twice.

Each PgBouncer instance is started once per module on a free port and stopped at its end; every
test starts with an empty pool (``KILL``/``RESUME`` of its database on the admin console) and
leaves none of PgBouncer's server connections behind when its database is dropped. See
docs/pgbouncer.md.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from pgbouncer import PgBouncer, pgbouncer_binary, start_pgbouncer
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url
from support import ALL_REVS, finish, heads_of, stampede, start_worker, wait_for, worker_env

from alembic_autolock import ConfigError
from alembic_autolock.locks.postgresql import PostgresLock, advisory_key

pytestmark = pytest.mark.postgresql

NAMESPACE = "alembic_autolock:pgbouncer-test"


# --- PgBouncer instances (one per module and configuration) -------------------------------


def _bouncer(**config: Any) -> Iterator[PgBouncer]:
    if pgbouncer_binary() is None:
        message = (
            "pgbouncer is not installed (Debian: apt-get install -y pgbouncer); the PgBouncer "
            "tests need the real binary"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    bouncer = start_pgbouncer(**config)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="module")
def tx_bouncer() -> Iterator[PgBouncer]:
    """Transaction pooling, 5 server connections per database: 20 clients share them."""
    yield from _bouncer(pool_mode="transaction", pool_size=5)


@pytest.fixture(scope="module")
def single_bouncer() -> Iterator[PgBouncer]:
    """Transaction pooling with one server connection: every client shares one session.

    A client waits at most 5 s for the server connection (query_wait_timeout), then PgBouncer
    disconnects it: a self-deadlock on the one connection fails fast instead of at 120 s.
    """
    yield from _bouncer(pool_mode="transaction", pool_size=1, query_wait_timeout=5)


@pytest.fixture(scope="module")
def session_bouncer() -> Iterator[PgBouncer]:
    """Session pooling (a server session belongs to one client until it disconnects)."""
    yield from _bouncer(pool_mode="session", pool_size=25)


def _through(bouncer: PgBouncer, pg_url: str) -> Iterator[str]:
    database = make_url(pg_url).database
    assert database
    bouncer.reset(database)  # an empty pool: no server session of an earlier test
    try:
        yield bouncer.url_for(pg_url)
    finally:
        bouncer.reset(database)  # no PgBouncer server connection keeps the database busy


@pytest.fixture
def tx_url(pg_url: str, tx_bouncer: PgBouncer) -> Iterator[str]:
    """The test's database through the transaction-mode PgBouncer (pool of 5)."""
    yield from _through(tx_bouncer, pg_url)


@pytest.fixture
def single_url(pg_url: str, single_bouncer: PgBouncer) -> Iterator[str]:
    """The test's database through the transaction-mode PgBouncer with a pool of one."""
    yield from _through(single_bouncer, pg_url)


@pytest.fixture
def session_url(pg_url: str, session_bouncer: PgBouncer) -> Iterator[str]:
    """The test's database through the session-mode PgBouncer."""
    yield from _through(session_bouncer, pg_url)


# --- helpers -------------------------------------------------------------------------------


def _advisory_holders(pg_url: str, key: int) -> list[tuple[int, bool]]:
    """(pid, granted) of every session that holds or waits for ``key``, read directly."""
    url = make_url(pg_url)
    conn = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, connect_timeout=5
    )
    try:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute(
            "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
            " AND ((classid::bigint << 32) | objid::bigint) = %s ORDER BY pid",
            (key,),
        )
        return [(int(pid), bool(granted)) for pid, granted in cur.fetchall()]
    finally:
        conn.close()


def _assert_names_pgbouncer(message: str) -> None:
    assert "PgBouncer" in message, message
    assert "lock_url" in message, message


def _xacts_through(bouncer: PgBouncer, database: str) -> int:
    rows = [r for r in bouncer.admin("SHOW STATS") if r["database"] == database]
    return sum(int(r["total_xact_count"]) for r in rows)


# --- a: a stampede through PgBouncer with lock_url is exactly-once -------------------------


@pytest.mark.parametrize("lock_via", ["direct", "session-pool"])
def test_stampede_through_transaction_pooling_with_lock_url_is_exactly_once(
    lock_via: str,
    pg_url: str,
    tx_url: str,
    tx_bouncer: PgBouncer,
    request: pytest.FixtureRequest,
    make_ini: Callable[..., str],
    trace: Any,
) -> None:
    """20 processes through transaction pooling, lock_url direct or session-pooled: exactly-once."""
    lock_url = pg_url if lock_via == "direct" else request.getfixturevalue("session_url")
    ini = make_ini(tx_url)
    outcomes = stampede(
        20,
        ini,
        tx_url,
        "--setting",
        f"lock_url={lock_url}",
        env=worker_env(AUTOLOCK_TEST_SLEEP="0.05"),
    )

    for outcome in outcomes:
        assert outcome.returncode == 0, (outcome.data, outcome.stderr)
        assert outcome.data["heads"] == ["r5"], outcome.data
    assert trace.bodies() == ALL_REVS  # each body ran once, in order, whoever ran it
    assert len({parts[2] for parts in trace.lines()}) == 1  # all of them in one process
    assert sum(1 for o in outcomes if o.data["applied"]) == 1
    assert heads_of(pg_url) == {"r5"}
    # r4's CREATE INDEX CONCURRENTLY (autocommit_block) went through transaction pooling too.
    assert heads_of(tx_url) == {"r5"}
    database = make_url(pg_url).database
    assert database
    assert _xacts_through(tx_bouncer, database) > 0  # the migrations really used PgBouncer
    assert _advisory_holders(pg_url, advisory_key(_namespace(pg_url))) == []


def _namespace(pg_url: str) -> str:
    """The namespace ensure_migrated derives for the test database (as in the lock events)."""
    return f"alembic_autolock:{make_url(pg_url).database}::alembic_version"


# --- b: a shared server session is detected -----------------------------------------------


def test_second_lock_on_a_shared_server_session_raises_config_error(
    pg_url: str, single_url: str, make_engine: Callable[..., Engine]
) -> None:
    """Two lock connections sharing PgBouncer's one server session: the second raises ConfigError.

    Deterministic: with default_pool_size = 1 PgBouncer has exactly one server session for the
    database, so both clients' lock statements run in it. The first PostgresLock takes the lock
    in that session (its lock connection goes through the pool: lock_url at PgBouncer, the app
    engine direct). The second, without lock_url and with the app engine through the pool,
    acquires in the same session, where the lock is already granted (session locks are
    re-entrant, so pg_try_advisory_lock says true), and must refuse. The holder keeps the lock
    exactly once; one release frees it.
    """
    first = PostgresLock(make_engine(pg_url), NAMESPACE, lock_url=single_url)
    second = PostgresLock(make_engine(single_url), NAMESPACE)
    try:
        assert first.attempt(None, first=None, describe=False).got is True
        holders = _advisory_holders(pg_url, first.key)
        assert len(holders) == 1 and holders[0][1], holders

        with pytest.raises(ConfigError) as caught:
            second.attempt(None, first=None, describe=False)
        _assert_names_pgbouncer(str(caught.value))
        assert f"pid {holders[0][0]}" in str(caught.value)  # the shared server session
        assert caught.value.key == "lock_url"

        # The refusal undid its own re-entrant grant: the holder still holds, exactly once.
        assert first.lost() is None
        assert _advisory_holders(pg_url, first.key) == holders
    finally:
        second.release()
        first.release()
    assert _advisory_holders(pg_url, first.key) == []  # one unlock freed it: no extra grant


def test_worker_sharing_the_holders_session_refuses_to_migrate(
    pg_url: str, single_url: str, make_ini: Callable[..., str], trace: Any
) -> None:
    """A process without lock_url, in a pooled session that holds the lock: ConfigError, no body.

    Deterministic: another client of the pool of one holds the migration lock (a plain
    pg_advisory_lock in autocommit, so its server session is idle between statements). The
    worker's reads and its lock attempt all run in that one server session, where the lock is
    already granted. (A worker hanging inside a revision would not do: it would keep the only
    server connection in its open transaction, and the second client would queue in PgBouncer
    instead of reaching the lock.) After the holder lets go, a worker with lock_url (PostgreSQL
    directly) migrates through the same pool of one, each revision once.
    """
    key = advisory_key(_namespace(pg_url))
    url = make_url(single_url)
    holder = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, connect_timeout=5
    )
    ini = make_ini(single_url)
    try:
        holder.autocommit = True
        cur = holder.cursor()
        cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        held = _advisory_holders(pg_url, key)
        assert len(held) == 1 and held[0][1], held

        outcome = finish(start_worker(ini, single_url))
        assert outcome.returncode == 1, (outcome.data, outcome.stderr)
        assert outcome.data["error"] == "ConfigError", outcome.data
        _assert_names_pgbouncer(outcome.data["message"])
        assert _advisory_holders(pg_url, key) == held  # the refusal left the holder's lock alone

        cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
        assert cur.fetchone() == (True,)  # held once: the worker's grant was undone
    finally:
        holder.close()
    assert _advisory_holders(pg_url, key) == []
    assert trace.bodies() == []
    assert heads_of(pg_url) == set()

    outcome = finish(start_worker(ini, single_url, "--setting", f"lock_url={pg_url}"))
    assert outcome.returncode == 0, (outcome.data, outcome.stderr)
    assert outcome.data["applied"] == ALL_REVS
    assert trace.bodies() == ALL_REVS
    assert heads_of(pg_url) == {"r5"}


# --- c: why the detection is needed, and the other way the sharing shows ------------------


def test_a_lone_process_behind_a_pool_of_one_without_lock_url_is_told_why(
    pg_url: str, single_url: str, make_ini: Callable[..., str], trace: Any
) -> None:
    """Without lock_url behind a pool of one, even a lone process refuses, naming PgBouncer.

    Deterministic: there is one server session; the lock is taken in it, then the migration
    connection's first transaction holds it, so the lock check before r1 cannot be served.
    """
    outcome = finish(start_worker(make_ini(single_url), single_url))
    assert trace.bodies() == []
    assert heads_of(pg_url) == set()
    assert outcome.returncode == 1, (outcome.data, outcome.stderr)
    _assert_names_pgbouncer(outcome.data.get("message", ""))
    assert "lock.release_failed" not in outcome.stderr, outcome.stderr


def test_transaction_pooling_grants_one_session_lock_to_two_clients(
    pg_url: str, single_url: str
) -> None:
    """The premise: through transaction pooling, pg_try_advisory_lock says true to two clients.

    Deterministic for the same reason as above (one server session). Without the library's
    "already held by this session" check, both would migrate at once.
    """
    url = make_url(single_url)
    clients = [
        psycopg2.connect(
            host=url.host, port=url.port, user=url.username, dbname=url.database, connect_timeout=5
        )
        for _ in range(2)
    ]
    try:
        got = []
        for conn in clients:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("SELECT pg_try_advisory_lock(%s), pg_backend_pid()", (advisory_key("x"),))
            got.append(cur.fetchone())
        assert [g[0] for g in got] == [True, True]  # both clients "hold" the lock
        assert got[0][1] == got[1][1]  # in one and the same server session
    finally:
        for conn in clients:
            conn.close()


def test_without_lock_url_a_process_through_transaction_pooling_applies_nothing(
    pg_url: str, tx_url: str, make_ini: Callable[..., str], trace: Any
) -> None:
    """Without lock_url, one process through transaction pooling refuses before r1 (LockLost).

    Deterministic: the pool starts empty and a single client runs one statement at a time, so
    PgBouncer serves it from one server session S1: the reads, the lock, then the migration
    connection's first transaction. That transaction keeps S1, so the lock check before r1 is
    served by a second server session, whose pid differs from the one that took the lock; the
    library reports the lock lost (naming PgBouncer and lock_url) before any revision runs.
    """
    ini = make_ini(tx_url)
    outcome = finish(start_worker(ini, tx_url))
    assert outcome.returncode == 1, (outcome.data, outcome.stderr)
    # Today the lock check before r1 raises LockLost; a check that refuses the shared session
    # already at acquire time (ConfigError) would pin the same behaviour: nothing applied.
    assert outcome.data["error"] in ("LockLost", "ConfigError"), outcome.data
    if outcome.data["error"] == "LockLost":
        assert outcome.data["revision"] == "r1" and outcome.data["applied"] == []
    assert "server session" in outcome.data["message"]
    _assert_names_pgbouncer(outcome.data["message"])
    assert trace.bodies() == []
    assert heads_of(pg_url) == set()


def test_lock_url_at_a_transaction_pool_is_reported_lost(
    pg_url: str, tx_url: str, make_engine: Callable[..., Engine]
) -> None:
    """lock_url pointed at a transaction pool: lost() names the changed session and PgBouncer.

    Deterministic: the pool starts empty and the lock connection runs one statement at a time,
    so the lock is taken in the only server session S1. Another client then opens a transaction,
    which PgBouncer serves from S1 (the only idle one) and keeps until it ends, so the lock
    connection's next statement must be served by a second server session.
    """
    lock = PostgresLock(make_engine(pg_url), NAMESPACE, lock_url=tx_url)
    other = make_engine(tx_url).connect()
    try:
        assert lock.attempt(None, first=None, describe=False).got is True
        assert lock.lost() is None
        held = _advisory_holders(pg_url, lock.key)
        assert len(held) == 1, held
        pinned = other.execute(text("SELECT pg_backend_pid()")).scalar_one()  # BEGIN; keeps S1
        assert pinned == held[0][0], "PgBouncer served the other client from a new session"
        reason = lock.lost()
        assert reason is not None
        assert f"not {held[0][0]} that took the lock" in reason
        _assert_names_pgbouncer(reason)
    finally:
        other.rollback()
        other.close()
        lock.release()


# --- the orphan reaper behind PgBouncer ---------------------------------------------------


@pytest.mark.parametrize("app_state", ["idle in transaction", "active"])
def test_a_later_migration_leaves_application_sessions_alone(
    app_state: str, pg_url: str, tx_url: str, make_ini: Callable[..., str], trace: Any
) -> None:
    """A migration through PgBouncer never terminates an application session it did not start.

    Deterministic: the pool starts empty and the first migration (lock_url direct) runs one
    statement at a time, so it uses the only server session S1; an application transaction
    opened next is served from S1. (A session-level tag such as application_name would still be
    on S1, since PgBouncer does not reset it for a client that never set one; the
    per-statement comment the library uses is not.)
    It stays idle in transaction, or runs pg_sleep(60) (seen active in pg_stat_activity before
    going on, cancelled afterwards), while a second migration (a downgrade to r4) runs.
    """
    ini = make_ini(tx_url, lock_url=pg_url, orphan_wait="0.2")
    first = finish(start_worker(ini, tx_url))
    if first.returncode != 0:
        pytest.fail(f"the first migration failed: {first.data} {first.stderr}")
    url = make_url(tx_url)
    app = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, connect_timeout=5
    )
    errors: list[BaseException] = []
    sleeper: threading.Thread | None = None
    try:
        cur = app.cursor()  # not autocommit: BEGIN, and the server session stays with us
        cur.execute("SELECT pg_backend_pid()")  # served from S1, which ran the migration
        app_pid = cur.fetchone()[0]
        if app_state == "active":

            def sleep() -> None:
                try:
                    cur.execute("SELECT pg_sleep(60)")
                except BaseException as exc:
                    errors.append(exc)

            sleeper = threading.Thread(target=sleep)
            sleeper.start()
            if not wait_for(lambda: _state_of(pg_url, app_pid) == "active", 30):
                pytest.fail("precondition: the application's pg_sleep is not running")
        second = finish(start_worker(ini, tx_url, "--op", "downgrade", "--rev", "r4"))
        if second.returncode != 0:
            pytest.fail(f"the downgrade failed: {second.data} {second.stderr}")
        if sleeper is not None:
            _cancel(pg_url, app_pid)
            sleeper.join(30)
            terminated = any(not isinstance(e, psycopg2.errors.QueryCanceled) for e in errors)
        else:
            try:
                cur.execute("SELECT 1")
                terminated = cur.fetchone() != (1,)
            except psycopg2.OperationalError:
                terminated = True
        assert "orphan.terminated" not in second.stderr, second.stderr
        assert not terminated, "the application's session was terminated"
    finally:
        app.close()
    assert trace.bodies("down") == ["r5"]


def _direct(pg_url: str) -> Any:
    url = make_url(pg_url)
    conn = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, connect_timeout=5
    )
    conn.autocommit = True
    return conn


def _state_of(pg_url: str, pid: int) -> str | None:
    conn = _direct(pg_url)
    try:
        cur = conn.cursor()
        cur.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cur.fetchone()
        return row[0] if row else None
    finally:
        conn.close()


def _cancel(pg_url: str, pid: int) -> None:
    conn = _direct(pg_url)
    try:
        conn.cursor().execute("SELECT pg_cancel_backend(%s)", (pid,))
    finally:
        conn.close()
