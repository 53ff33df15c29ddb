"""tests/servers.py against real processes: private PostgreSQL and MariaDB servers (limits,
restart, crash and recovery, cleanup), the TCP relay's faults over PostgreSQL, MariaDB and
Redis, and the connection sampler."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pymysql
import pytest
from servers import (
    ConnectionSampler,
    PrivateMariaDB,
    PrivatePostgres,
    TcpRelay,
    mariadb_unavailable,
    postgres_unavailable,
)
from support import REPO, wait_for


def _need(reason: str | None) -> None:
    """Skip when the server binaries are missing; in CI that fails the run instead."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def new_pg(tmp_path: Path) -> Iterator[Callable[..., PrivatePostgres]]:
    """new_pg(**options): a private PostgreSQL for this test, closed after it."""
    _need(postgres_unavailable())
    made: list[PrivatePostgres] = []

    def make(**options: Any) -> PrivatePostgres:
        server = PrivatePostgres(tmp_path / f"pg{len(made)}", **options)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture(scope="module")
def shared_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    """One private PostgreSQL for the relay and sampler tests of this module."""
    _need(postgres_unavailable())
    with PrivatePostgres(tmp_path_factory.mktemp("pg"), log_connections=True) as server:
        yield server


@pytest.fixture(scope="module")
def private_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMariaDB]:
    _need(mariadb_unavailable())
    with PrivateMariaDB(tmp_path_factory.mktemp("mariadb")) as server:
        yield server


@pytest.fixture
def relay_to(shared_pg: PrivatePostgres) -> Iterator[Callable[[int], TcpRelay]]:
    """relay_to(port): a TcpRelay to 127.0.0.1:port, closed after the test."""
    made: list[TcpRelay] = []

    def make(port: int) -> TcpRelay:
        relay = TcpRelay("127.0.0.1", port)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def _pg_connect(port: int, dbname: str = "postgres", **kwargs: Any) -> Any:
    kwargs.setdefault("connect_timeout", 5)
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname, **kwargs)
    conn.autocommit = True
    return conn


def _query(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


class _InThread:
    """Run ``fn`` in a thread; ``.done``, ``.result`` and ``.error`` say how it went."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc
            self.ended_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return self.done


# --- PrivatePostgres -------------------------------------------------------------------------


@pytest.mark.postgresql
def test_postgres_refuses_the_connection_over_max_connections(
    new_pg: Callable[..., PrivatePostgres],
) -> None:
    """With max_connections=5 the superuser gets 5 sessions and the 6th is refused."""
    pg = new_pg(max_connections=5)
    conns = [pg.connect() for _ in range(5)]
    try:
        with pytest.raises(psycopg2.OperationalError, match="too many clients"):
            pg.connect()
    finally:
        for conn in conns:
            conn.close()
    assert wait_for(lambda: _can_connect(pg), 5)  # the slots come back


def _can_connect(pg: PrivatePostgres) -> bool:
    try:
        pg.connect().close()
    except psycopg2.OperationalError:
        return False
    return True


@pytest.mark.postgresql
def test_postgres_starts_with_fewer_connections_than_the_default_reserve(
    new_pg: Callable[..., PrivatePostgres],
) -> None:
    """max_connections=2 works: no connection is reserved (the default 3 would refuse to start)."""
    pg = new_pg(max_connections=2)
    assert pg.execute("SHOW superuser_reserved_connections") == [("0",)]


@pytest.mark.postgresql
def test_postgres_takes_another_port_if_its_port_was_taken(
    new_pg: Callable[..., PrivatePostgres], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port taken between choosing it and binding it is replaced by another free one."""
    import socket

    import servers

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = servers.free_port
        monkeypatch.setattr(servers, "free_port", lambda: next(ports, None) or real_free_port())
        pg = new_pg()
        assert pg.port != taken and pg.running
        assert "Address already in use" in pg.log_since(0)


@pytest.mark.postgresql
def test_postgres_restart_keeps_data(new_pg: Callable[..., PrivatePostgres]) -> None:
    """Data survives a fast restart and an immediate stop, on the same port."""
    pg = new_pg()
    port = pg.port
    pg.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)", pg.create_database("app"))
    pg.restart()
    assert pg.port == port
    assert pg.execute("SELECT x FROM t", "app") == [(1,)]
    pg.stop("immediate")
    assert not pg.running
    with pytest.raises(psycopg2.OperationalError):
        pg.connect(connect_timeout=1)
    pg.start()
    assert pg.execute("SELECT x FROM t", "app") == [(1,)]


@pytest.mark.postgresql
@pytest.mark.parametrize("children", [True, False])
def test_postgres_kill_then_start_recovers(
    new_pg: Callable[..., PrivatePostgres], children: bool
) -> None:
    """kill() crashes the server under an open session; start() recovers the committed data."""
    pg = new_pg()
    pg.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    conn = pg.connect()
    pg.kill(children=children)
    assert not pg.running
    with pytest.raises(psycopg2.OperationalError):
        _query(conn, "SELECT 1")
    conn.close()
    pg.start()
    assert pg.execute("SELECT x FROM t") == [(1,)]
    assert "database system was interrupted" in pg.log_since(0)  # crash recovery ran


@pytest.mark.postgresql
def test_postgres_counts_connections_exactly_from_its_log(
    new_pg: Callable[..., PrivatePostgres],
) -> None:
    """With log_connections, count_connections_since counts every connection, per database."""
    pg = new_pg(log_connections=True)
    pg.create_database("app")
    offset = pg.log_offset()
    for _ in range(3):
        pg.connect("app").close()
    pg.connect("postgres").close()
    assert pg.count_connections_since(offset, "app") == 3
    assert pg.count_connections_since(offset) == 4


@pytest.mark.postgresql
def test_postgres_close_stops_it_and_removes_its_files(
    new_pg: Callable[..., PrivatePostgres],
) -> None:
    """close() ends the server and leaves nothing of it: data (also on tmpfs), socket, log."""
    pg = new_pg()
    real_data = pg.data_dir.resolve()
    port = pg.port
    pg.close()
    assert not pg.running
    assert not real_data.exists() and not pg.data_dir.exists()
    assert not pg.log_path.exists() and not (pg.socket_dir / f".s.PGSQL.{port}").exists()
    with pytest.raises(psycopg2.OperationalError):
        _pg_connect(port, connect_timeout=1)


@pytest.mark.postgresql
def test_a_server_does_not_outlive_a_process_that_dies_without_cleaning_up(
    tmp_path: Path,
) -> None:
    """The watchdog stops the server and removes its tmpfs data when its owner is killed."""
    _need(postgres_unavailable())
    script = (
        "import os, sys\n"
        "from servers import PrivatePostgres\n"
        f"pg = PrivatePostgres({str(tmp_path / 'pg')!r})\n"
        "print(pg.port, pg.data_dir.resolve(), flush=True)\n"
        "os._exit(1)  # no atexit, no close(): like pytest-timeout's thread method\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO / "tests",
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
    )
    port_text, data = out.stdout.split()
    port = int(port_text)
    assert wait_for(lambda: not _port_open(port), 10), "the orphaned server is still listening"
    if data.startswith("/dev/shm/"):
        assert wait_for(lambda: not Path(data).exists(), 10)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- TcpRelay --------------------------------------------------------------------------------


def test_relay_url_for_rewrites_only_host_and_port() -> None:
    """url_for keeps scheme, credentials, database and query exactly; only host:port change."""
    relay = TcpRelay("127.0.0.1", 9)
    try:
        here = f"127.0.0.1:{relay.port}"
        assert relay.url_for("postgresql+psycopg2://u:p%40ss@db.example:5432/app?sslmode=off") == (
            f"postgresql+psycopg2://u:p%40ss@{here}/app?sslmode=off"
        )
        assert relay.url_for("redis://127.0.0.1:6379/0") == f"redis://{here}/0"
        assert (
            relay.url_for("mysql+pymysql://root@127.0.0.1:3306") == f"mysql+pymysql://root@{here}"
        )
    finally:
        relay.close()


@pytest.mark.postgresql
def test_relay_forwards_many_concurrent_connections(
    shared_pg: PrivatePostgres, relay_to: Callable[[int], TcpRelay]
) -> None:
    """Twelve sessions at once through the relay each get their own answers."""
    relay = relay_to(shared_pg.port)
    conns = [_pg_connect(relay.port, application_name=f"relayed-{i}") for i in range(12)]
    try:
        assert relay.connections == 12
        for i, conn in enumerate(conns):
            assert _query(conn, "SELECT current_setting('application_name')") == [(f"relayed-{i}",)]
        big = _query(conns[0], "SELECT repeat('x', 3000000)")[0][0]  # more than any buffer
        assert len(big) == 3_000_000
    finally:
        for conn in conns:
            conn.close()
    assert wait_for(lambda: relay.connections == 0, 5)  # closes are passed on


@pytest.mark.postgresql
def test_relay_cut_fails_an_in_flight_query_fast(
    shared_pg: PrivatePostgres, relay_to: Callable[[int], TcpRelay]
) -> None:
    """cut() resets a session waiting on a 30 s query: the client fails at once, then reconnects."""
    relay = relay_to(shared_pg.port)
    conn = _pg_connect(relay.port, application_name="to-be-cut")
    running = _InThread(lambda: _query(conn, "SELECT pg_sleep(30)"))
    assert wait_for(
        lambda: shared_pg.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'to-be-cut' "
            "AND state = 'active'"
        ),
        5,
    )
    cut_at = time.monotonic()
    assert relay.cut() == 1
    assert running.join(5)
    assert isinstance(running.error, psycopg2.OperationalError)
    assert running.ended_at is not None and running.ended_at - cut_at < 2
    conn.close()
    again = _pg_connect(relay.port)
    assert _query(again, "SELECT 1") == [(1,)]
    again.close()


@pytest.mark.postgresql
def test_relay_stall_hangs_queries_and_resume_lets_them_through(
    shared_pg: PrivatePostgres, relay_to: Callable[[int], TcpRelay]
) -> None:
    """During stall() a query hangs and a new connection times out; resume() delivers both."""
    relay = relay_to(shared_pg.port)
    conn = _pg_connect(relay.port)
    relay.stall()
    hanging = _InThread(lambda: _query(conn, "SELECT 42"))
    assert not hanging.join(0.7)
    with pytest.raises(psycopg2.OperationalError, match="timeout"):
        _pg_connect(relay.port, connect_timeout=1)
    relay.resume()
    assert hanging.join(5) and hanging.result == [(42,)]
    fresh = _pg_connect(relay.port, connect_timeout=2)
    assert _query(fresh, "SELECT 1") == [(1,)]
    fresh.close()
    conn.close()


@pytest.mark.postgresql
def test_relay_refuse_resets_new_connections_until_resume(
    shared_pg: PrivatePostgres, relay_to: Callable[[int], TcpRelay]
) -> None:
    """refuse() fails connection attempts at once (no timeout); resume() accepts them again."""
    relay = relay_to(shared_pg.port)
    relay.refuse()
    began = time.monotonic()
    with pytest.raises(psycopg2.OperationalError):
        _pg_connect(relay.port, connect_timeout=5)
    assert time.monotonic() - began < 2
    relay.resume()
    conn = _pg_connect(relay.port)
    assert _query(conn, "SELECT 1") == [(1,)]
    conn.close()


@pytest.mark.redis
def test_relay_faults_over_redis(own_redis: Any) -> None:
    """Redis through the relay: PING works, times out during stall(), a BLPOP is cut at once."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    relay = TcpRelay("127.0.0.1", own_redis.port)
    try:

        def client() -> Any:
            return redis.Redis.from_url(
                relay.url_for(own_redis.url), socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
            )

        assert client().ping()
        relay.stall()
        with pytest.raises(redis.TimeoutError):
            client().ping()
        relay.resume()
        assert client().ping()
        blocked = client()
        blocked.ping()
        waiting = _InThread(lambda: blocked.blpop(["nothing-comes"], timeout=0))
        time.sleep(0.2)
        assert not waiting.done
        relay.cut()
        assert waiting.join(2) and isinstance(waiting.error, redis.ConnectionError)
    finally:
        relay.close()


@pytest.mark.mysql
def test_relay_faults_over_mariadb(private_mariadb: PrivateMariaDB) -> None:
    """MariaDB through the relay: a query works, times out during stall(), is cut at once."""
    relay = TcpRelay("127.0.0.1", private_mariadb.port)
    try:

        def connect() -> Any:
            return pymysql.connect(
                host="127.0.0.1", port=relay.port, user="root", read_timeout=0.5, connect_timeout=2
            )

        conn = connect()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
        relay.stall()
        with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        relay.resume()
        sleeper = pymysql.connect(host="127.0.0.1", port=relay.port, user="root")
        sleeping = _InThread(lambda: sleeper.cursor().execute("SELECT SLEEP(30)"))
        time.sleep(0.2)
        relay.cut()
        assert sleeping.join(2) and isinstance(sleeping.error, pymysql.err.OperationalError)
        fresh = connect()
        assert fresh.cursor().execute("SELECT 1") == 1
        fresh.close()
    finally:
        relay.close()


# --- ConnectionSampler -----------------------------------------------------------------------


@pytest.mark.postgresql
def test_sampler_counts_library_sessions_by_role(shared_pg: PrivatePostgres) -> None:
    """Idle autolock:wait/lock sessions, a migration session named autolock:migrate, plain
    sessions."""
    db = shared_pg.create_database("sampled_roles")
    offset = shared_pg.log_offset()
    with ConnectionSampler(shared_pg.url(), db) as sampler:
        waits = [shared_pg.connect(db, application_name=f"autolock:wait:k:{i}") for i in range(4)]
        locks = [shared_pg.connect(db, application_name="autolock:lock:k:1")]
        plain = [shared_pg.connect(db) for _ in range(2)]
        migrating = shared_pg.connect(db, application_name="autolock:migrate:k:1")
        migration = _InThread(lambda: _query(migrating, "SELECT pg_sleep(0.4)"))
        assert migration.join(5) and migration.error is None
        time.sleep(0.1)
        for conn in [*waits, *locks, *plain, migrating]:
            conn.close()
        assert wait_for(
            lambda: (
                not shared_pg.execute(
                    f"SELECT 1 FROM pg_stat_activity WHERE datname = '{db}'"
                    " AND application_name <> 'connection-sampler'"
                )
            ),
            5,
        )
    summary = sampler.summary
    assert summary is not None
    assert summary.peak_total == 8
    assert summary.peak_library == 6
    assert summary.peak_by_role == {"autolock:wait": 4, "autolock:lock": 1, "autolock:migrate": 1}
    assert summary.series[0].total == 0 and summary.series[-1].total == 0
    assert summary.new_sessions == 8
    assert summary.exact_connection_count and summary.connections_opened == 8
    assert shared_pg.count_connections_since(offset, db) == 8
    assert summary.errors == 0 and summary.samples > 10


@pytest.mark.postgresql
def test_sampler_counts_short_connections_exactly(shared_pg: PrivatePostgres) -> None:
    """Thirty connections of a few ms each: pg_stat_database.sessions counts them all, as the
    log does; sampling every 20 ms sees at most that many."""
    db = shared_pg.create_database("sampled_burst")
    offset = shared_pg.log_offset()
    with ConnectionSampler(shared_pg.url(), db) as sampler:
        for _ in range(30):
            shared_pg.connect(db).close()
        assert wait_for(
            lambda: (
                not shared_pg.execute(
                    f"SELECT 1 FROM pg_stat_activity WHERE datname = '{db}'"
                    " AND application_name <> 'connection-sampler'"
                )
            ),
            5,
        )
    summary = sampler.summary
    assert summary is not None
    assert shared_pg.count_connections_since(offset, db) == 30
    assert summary.connections_opened == 30
    assert sum(summary.connects_per_second) == 30
    assert summary.peak_connects_per_second >= 15  # they took well under 2 s
    assert summary.new_sessions <= 30


@pytest.mark.postgresql
def test_sampler_survives_a_server_restart(new_pg: Callable[..., PrivatePostgres]) -> None:
    """A restart under the sampler costs it some samples, not its life."""
    pg = new_pg()
    db = pg.create_database("app")
    with ConnectionSampler(pg.url(), db) as sampler:
        time.sleep(0.1)
        pg.stop("fast")
        time.sleep(0.2)
        pg.start()
        held = [pg.connect(db, application_name="autolock:wait:x") for _ in range(2)]
        assert wait_for(lambda: sampler.latest is not None and sampler.latest.library == 2, 5)
        for conn in held:
            conn.close()
    summary = sampler.summary
    assert summary is not None
    assert summary.errors > 0
    assert summary.peak_by_role == {"autolock:wait": 2}


# --- PrivateMariaDB and its sampler ----------------------------------------------------------


@pytest.mark.mysql
def test_mariadb_starts_answers_restarts_and_recovers_from_kill(tmp_path: Path) -> None:
    """A private MariaDB: root without password over TCP, data kept over restart and kill."""
    _need(mariadb_unavailable())
    with PrivateMariaDB(tmp_path / "my", max_connections=12) as db:
        assert db.url("app").endswith(f"127.0.0.1:{db.port}/app")
        assert db.execute("SELECT @@port, @@max_connections, @@log_bin") == [(db.port, 12, 0)]
        db.create_database("app")
        db.execute("CREATE TABLE t (x int) ENGINE=InnoDB", "app")
        db.execute("INSERT INTO t VALUES (1)", "app")
        db.restart()
        assert db.execute("SELECT x FROM t", "app") == [(1,)]
        conn = db.connect("app")
        db.kill()
        assert not db.running
        with pytest.raises(pymysql.err.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        db.start()
        assert db.execute("SELECT x FROM t", "app") == [(1,)]
        data = db.data_dir.resolve()
    assert not data.exists()


@pytest.mark.mysql
def test_mariadb_sampler_sees_sessions_and_lock_waiters(private_mariadb: PrivateMariaDB) -> None:
    """The MariaDB twin: plain sessions, and one blocked in GET_LOCK('autolock:...') as a waiter."""
    db = private_mariadb.create_database("sampled")
    holder = private_mariadb.connect(db)
    waiter = private_mariadb.connect(db)
    idle = [private_mariadb.connect(db) for _ in range(2)]
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK('autolock:abc', 0)")
        with ConnectionSampler(private_mariadb.url(), db) as sampler:
            waiting = _InThread(
                lambda: waiter.cursor().execute("SELECT GET_LOCK('autolock:abc', 5)")
            )
            time.sleep(0.3)
            with holder.cursor() as cur:
                cur.execute("SELECT RELEASE_LOCK('autolock:abc')")
            assert waiting.join(5)
            extra = private_mariadb.connect(db)
            time.sleep(0.1)
            extra.close()
        summary = sampler.summary
        assert summary is not None
        assert summary.peak_total == 5
        assert summary.peak_by_role == {"autolock:wait": 1}
        assert summary.new_sessions == 1 and not summary.exact_connection_count
        assert summary.errors == 0
    finally:
        for conn in [holder, waiter, *idle]:
            conn.close()
