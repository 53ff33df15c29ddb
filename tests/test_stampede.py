"""Fleets of starters on a small server: waiting costs no database session.

Each test starts a private server with a small connection limit, releases N worker processes
at once (NullPool engines: the serverless shape) on an empty database, and samples the server's
sessions every 20 ms. Every process must succeed (no "too many clients"), exactly one must
migrate, each revision body must run once, and at no moment may the library hold more than
three sessions (the holder's lock session, its migration session, the designated waiter).

CI size: 40 processes against max_connections = 30 (PostgreSQL), 30 against MariaDB with
max_connections = 20, 30 with the Redis lock. AUTOLOCK_FULL_STAMPEDE=1 runs 200 / 100 / 200
against the stock limits (PostgreSQL 100, MariaDB 151); the timing targets are measured in
benchmarks/bench_stampede.py, never asserted here.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from servers import ConnectionSampler, PrivateMariaDB, PrivatePostgres
from support import ALL_REVS, heads_of, stampede, worker_env

from alembic_autolock.locks.mysql import lock_names
from alembic_autolock.locks.redis import key_name

FULL = bool(os.environ.get("AUTOLOCK_FULL_STAMPEDE"))
LIBRARY_SESSIONS_MAX = 3


def check_fleet(outcomes: list[Any], trace: Any, url: str) -> None:
    failures = [o.data or o.stderr[-500:] for o in outcomes if o.returncode != 0]
    assert failures == []
    actions = Counter(o.data["action"] for o in outcomes)
    assert actions["upgraded"] == 1, actions
    assert actions["upgraded"] + actions["current"] == len(outcomes), actions
    assert trace.bodies() == ALL_REVS  # every revision body ran exactly once
    assert heads_of(url) == {"r5"}


@pytest.mark.postgresql
def test_postgresql_fleet_fits_a_small_server(tmp_path: Path, make_ini: Any, trace: Any) -> None:
    """40 NullPool starters, max_connections = 30: no errors, one migrator, at most three
    library sessions at any moment (stock server, 200 starters, with AUTOLOCK_FULL_STAMPEDE)."""
    n, limit = (200, 100) if FULL else (40, 30)
    with PrivatePostgres(tmp_path / "pg", max_connections=limit) as pg:
        url = pg.url(pg.create_database("fleet"))
        ini = make_ini(url)
        with ConnectionSampler(pg.url(), "fleet") as sampler:
            outcomes = stampede(
                n, ini, url, "--nullpool", env=worker_env(AUTOLOCK_TEST_SLEEP="0.1")
            )
        check_fleet(outcomes, trace, url)
    summary = sampler.summary
    assert summary is not None and summary.errors == 0
    assert summary.peak_library <= LIBRARY_SESSIONS_MAX, summary.peak_by_role
    assert summary.peak_by_role.get("autolock:wait", 0) == 1  # somebody waited, designated
    assert summary.peak_total <= limit


@pytest.mark.mysql
def test_mariadb_fleet_fits_a_small_server(tmp_path: Path, make_ini: Any, trace: Any) -> None:
    """30 NullPool starters, max_connections = 20: no errors, one migrator, at most three
    sessions holding the lock, the designation or the fence at any moment."""
    n, limit = (100, None) if FULL else (30, 20)
    with PrivateMariaDB(tmp_path / "my", max_connections=limit) as db:
        url = db.url(db.create_database("fleet"))
        ini = make_ini(url)
        lock, wait, fence = lock_names("alembic_autolock:fleet::alembic_version")
        names = {"autolock:lock": lock, "autolock:wait": wait, "autolock:migrate": fence}
        with ConnectionSampler(db.url(), "fleet", mysql_locks=names) as sampler:
            outcomes = stampede(
                n, ini, url, "--nullpool", env=worker_env(AUTOLOCK_TEST_SLEEP="0.1")
            )
        check_fleet(outcomes, trace, url)
    summary = sampler.summary
    assert summary is not None and summary.errors == 0
    assert summary.peak_library <= LIBRARY_SESSIONS_MAX, summary.peak_by_role
    assert summary.peak_by_role.get("autolock:migrate", 0) == 1


@pytest.mark.redis
def test_redis_fleet_holds_no_database_session_while_waiting(
    tmp_path: Path, make_ini: Any, trace: Any, redis_url: str
) -> None:
    """30 NullPool starters with the Redis lock on a PostgreSQL of max_connections = 25: no
    errors, one migrator; in the database only the holder's migration session is the
    library's (its fence); the designation is a Redis key."""
    n, limit = (200, 100) if FULL else (30, 25)
    namespace = f"fleet-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url)
    try:
        with PrivatePostgres(tmp_path / "pg", max_connections=limit) as pg:
            url = pg.url(pg.create_database("fleet"))
            ini = make_ini(url, lock=redis_url, namespace=namespace)
            with ConnectionSampler(pg.url(), "fleet") as sampler:
                outcomes = stampede(
                    n, ini, url, "--nullpool", env=worker_env(AUTOLOCK_TEST_SLEEP="0.1")
                )
            check_fleet(outcomes, trace, url)
    finally:
        key = key_name(namespace)
        client.delete(f"lock:{key}", f"lock-signal:{key}", f"{key}:waiter")
        client.close()
    summary = sampler.summary
    assert summary is not None and summary.errors == 0
    assert summary.peak_by_role.get("autolock:migrate", 0) == 1
    assert summary.peak_by_role.get("autolock:wait", 0) == 0
    assert summary.peak_library <= LIBRARY_SESSIONS_MAX, summary.peak_by_role
