"""Target 3: uncontended lock acquire + release, per backend (PostgreSQL, MariaDB, Redis).

Ours is exactly what the runner does around a migration (``_runner._migrate``)::

    lock = MigrationLock(make_backend(settings, engine, namespace), namespace, settings.timeout)
    lock.acquire(); lock.release()

Baselines, measured in the same run: the raw floor on an already open driver connection
(``pg_try_advisory_lock``/``pg_advisory_unlock``, ``GET_LOCK``/``RELEASE_LOCK``, Redis
``SET NX PX``/``DEL``); the same on a connection opened for the purpose (ours opens one per
acquire); and, for context, plain Alembic's no-op ``command.upgrade(cfg, "head")``.
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    REDIS_URL,
    Row,
    Sample,
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
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url

from alembic import command
from alembic_autolock import _state
from alembic_autolock._settings import resolve_settings
from alembic_autolock.locks import MigrationLock, make_backend

TARGETS_NS = {"postgresql": 5e6, "mysql": 5e6, "redis": 2e6}

Components = list[tuple[str, Sample]]


def ours_cycle(lock_setting: str, engine: Engine, namespace: str) -> Callable[[], None]:
    """One acquire + release through the library, as the runner does it."""
    settings = resolve_settings({"lock": lock_setting}, None, environ={})

    def cycle() -> None:
        lock = MigrationLock(make_backend(settings, engine, namespace), namespace, settings.timeout)
        lock.acquire()
        lock.release()

    return cycle


def plain_noop(engine: Engine, ini: Path) -> Callable[[], None]:
    """Plain Alembic's no-op upgrade at head on the app's pooled connection (cookbook)."""
    cfg = Config(str(ini))

    def upgrade() -> None:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        cfg.attributes.pop("connection", None)

    return upgrade


def pg_raw(url: str, key: int) -> tuple[Callable[[], None], Callable[[], None], Any]:
    """(lock+unlock on an open psycopg2 connection, the same on a new connection, the conn)."""
    import psycopg2

    u = make_url(url)
    dsn = {"host": u.host, "port": u.port or 5432, "user": u.username, "dbname": u.database}
    conn = psycopg2.connect(**dsn)
    conn.autocommit = True
    cur = conn.cursor()

    def lock_unlock(c: Any = cur) -> None:
        c.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        if not c.fetchone()[0]:
            raise RuntimeError("raw advisory lock not acquired")
        c.execute("SELECT pg_advisory_unlock(%s)", (key,))
        c.fetchone()

    def fresh() -> None:
        fresh_conn = psycopg2.connect(**dsn)
        fresh_conn.autocommit = True
        try:
            lock_unlock(fresh_conn.cursor())
        finally:
            fresh_conn.close()

    return lock_unlock, fresh, conn


def mysql_params(url: str, **extra: Any) -> dict[str, Any]:
    """PyMySQL connect() arguments for ``url``."""
    u = make_url(url)
    return {
        "host": u.host,
        "port": u.port or 3306,
        "user": u.username,
        "password": u.password or "",
        "database": u.database,
        "autocommit": True,
        **extra,
    }


def mysql_raw(url: str, name: str) -> tuple[Callable[[], None], Callable[..., None], Any]:
    """(GET_LOCK+RELEASE_LOCK on an open PyMySQL connection, the same on a new one, the conn)."""
    import pymysql

    conn = pymysql.connect(**mysql_params(url))
    cur = conn.cursor()

    def lock_unlock(c: Any = cur) -> None:
        c.execute("SELECT GET_LOCK(%s, 0)", (name,))
        if c.fetchone()[0] != 1:
            raise RuntimeError("raw GET_LOCK not acquired")
        c.execute("SELECT RELEASE_LOCK(%s)", (name,))
        c.fetchone()

    def fresh(**extra: Any) -> None:
        fresh_conn = pymysql.connect(**mysql_params(url, **extra))
        try:
            lock_unlock(fresh_conn.cursor())
        finally:
            fresh_conn.close()

    return lock_unlock, fresh, conn


def redis_raw(key: str) -> tuple[Callable[[], None], Callable[[], None], Any]:
    """(SET NX PX + DEL on an open client, the same on a new client, the client)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)

    def set_del(c: Any = client) -> None:
        if not c.set(key, b"bench", nx=True, px=15_000):
            raise RuntimeError("raw SET NX not acquired")
        c.delete(key)

    def fresh() -> None:
        fresh_client = redis.Redis.from_url(REDIS_URL)
        try:
            set_del(fresh_client)
        finally:
            fresh_client.close()

    return set_del, fresh, client


def pg_components(url: str, engine: Engine, namespace: str, n: int, warm: int) -> Components:
    """Where PostgresLock's time goes: the new connection, SQLAlchemy, the statements."""
    import psycopg2

    from alembic_autolock.locks import postgresql as pg_lock

    u = make_url(url)
    dsn = {"host": u.host, "port": u.port or 5432, "user": u.username, "dbname": u.database}

    def connect_close() -> None:
        psycopg2.connect(**dsn).close()

    def sqlalchemy_side_connection() -> None:
        conn = engine.connect()
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.detach()
        conn.invalidate()
        conn.close()

    parts: Components = [
        (
            "PostgreSQL: psycopg2.connect() + close()",
            measure(connect_close, iterations=n, warmup=warm),
        ),
        (
            "PostgreSQL: SQLAlchemy engine.connect() (new), AUTOCOMMIT, detach, invalidate",
            measure(sqlalchemy_side_connection, iterations=n, warmup=warm),
        ),
    ]
    # the statements PostgresLock runs on its session, replayed on the raw driver (private
    # constants: a rename there must fail here, loudly)
    bind = re.compile(r"(?<!:):(key|wkey|marker|lock_name|wait_name)\b")
    try_sql, unlock_sql = (
        bind.sub(r"%(\1)s", str(sql)) for sql in (pg_lock._TRY_SQL, pg_lock._UNLOCK_SQL)
    )
    key, wkey, _ = pg_lock.keys(namespace + ":replay")
    values = {
        "key": key,
        "wkey": wkey,
        "marker": "autolock.held_replay",
        "lock_name": "autolock:lock",
        "wait_name": "autolock:wait",
    }

    def replay(cur: Any) -> None:
        cur.execute(try_sql, values)
        cur.fetchone()
        cur.execute(unlock_sql, values)
        cur.fetchone()

    def fresh_replay() -> None:
        conn = psycopg2.connect(**dsn)
        conn.autocommit = True
        try:
            replay(conn.cursor())
        finally:
            conn.close()

    open_conn = psycopg2.connect(**dsn)
    open_conn.autocommit = True
    try:
        cur = open_conn.cursor()
        parts.append(
            (
                "PostgreSQL: the lock session's 2 statements on an open psycopg2 connection",
                measure(lambda: replay(cur), iterations=n, warmup=warm),
            )
        )
    finally:
        open_conn.close()
    parts.append(
        (
            "PostgreSQL: the same 2 statements on a new psycopg2 connection each",
            measure(fresh_replay, iterations=n, warmup=warm),
        )
    )
    return parts


def pg_and_redis(counts: dict[str, int], parts: Components) -> list[Row]:
    """PostgreSQL advisory lock; then Redis (whose lock is used with this PostgreSQL engine)."""

    rows: list[Row] = []
    with pg_database() as url, tempfile.TemporaryDirectory() as tmp:
        envs = write_environments(Path(tmp), url, unique_namespace("lockpg"))
        migrate_to_head(envs)
        engine = create_engine(url)
        saved = list(sys.path)
        try:
            ns = unique_namespace("pg")
            digest = hashlib.blake2b(f"{ns}:raw".encode(), digest_size=8).digest()
            open_floor, fresh_floor, raw_conn = pg_raw(url, struct.unpack(">q", digest)[0])
            n, warm = counts["pg"], counts["warm"]
            try:
                ours = measure(ours_cycle("postgresql", engine, ns), iterations=n, warmup=warm)
                raw_open = measure(open_floor, iterations=counts["raw"], warmup=warm)
                raw_fresh = measure(fresh_floor, iterations=n, warmup=warm)
            finally:
                raw_conn.close()
            parts.extend(pg_components(url, engine, ns, n, warm))
            plain = measure(
                plain_noop(engine, envs.plain),
                iterations=counts["plain"],
                warmup=3,
                after=restore_sys_path(saved),
            )
            group = f"3. lock acquire+release: PostgreSQL ({masked(url)})"
            name = "MigrationLock(PostgresLock)"
            target = TARGETS_NS["postgresql"]
            rows += [
                Row(group, name, ours, "raw try_advisory_lock+unlock, open conn", raw_open, target),
                Row(group, name, ours, "raw: new psycopg2 conn + lock + unlock", raw_fresh, target),
                Row(group, name, ours, "plain Alembic no-op upgrade (context)", plain, target),
            ]
            rows += redis_rows(engine, plain, counts, parts)
        finally:
            sys.path[:] = saved
            engine.dispose()
            _state.reset()
    return rows


def redis_rows(
    engine: Engine, plain_pg: Sample, counts: dict[str, int], parts: Components
) -> list[Row]:
    """The Redis lock (python-redis-lock under our wrapper) against raw SET NX + DEL."""
    import importlib.metadata

    import redis

    from alembic_autolock.locks.redis import key_name

    ns = unique_namespace("redis")
    raw_key = f"{ns}:raw"
    open_floor, fresh_floor, client = redis_raw(raw_key)
    n, warm = counts["redis"], counts["warm"]
    try:
        ours = measure(ours_cycle(REDIS_URL, engine, ns), iterations=n, warmup=warm)
        raw_open = measure(open_floor, iterations=counts["raw"], warmup=warm)
        raw_fresh = measure(fresh_floor, iterations=n, warmup=warm)
    finally:
        name = key_name(ns)
        client.delete(raw_key, f"lock:{name}", f"lock-signal:{name}")
        client.close()
    parts.append(
        (
            "Redis: redis.Redis.from_url() (constructor only, no I/O)",
            measure(lambda: redis.Redis.from_url(REDIS_URL), iterations=n, warmup=warm),
        )
    )
    parts.append(
        (
            "Redis: importlib.metadata.version('redis') (redis-py runs it per new connection)",
            measure(lambda: importlib.metadata.version("redis"), iterations=n, warmup=warm),
        )
    )
    group = f"3. lock acquire+release: Redis ({masked(REDIS_URL)})"
    label = "MigrationLock(RedisLock)"
    target = TARGETS_NS["redis"]
    return [
        Row(group, label, ours, "raw SET NX PX + DEL, open client", raw_open, target),
        Row(group, label, ours, "raw: new client + SET NX PX + DEL", raw_fresh, target),
        Row(group, label, ours, "plain Alembic no-op upgrade, PG (context)", plain_pg, target),
    ]


def mysql_rows(counts: dict[str, int], parts: Components) -> list[Row]:
    """MariaDB GET_LOCK, with PyMySQL's defaults and with TLS switched off in the engine."""
    import ssl

    import pymysql

    with mysql_database() as url, tempfile.TemporaryDirectory() as tmp:
        envs = write_environments(Path(tmp), url, unique_namespace("lockmy"))
        migrate_to_head(envs)
        engine = create_engine(url)
        no_tls = create_engine(url, connect_args={"ssl_disabled": True})
        saved = list(sys.path)
        try:
            ns = unique_namespace("my")
            raw_name = "autolock_bench:" + hashlib.blake2b(ns.encode(), digest_size=8).hexdigest()
            open_floor, fresh_floor, raw_conn = mysql_raw(url, raw_name)
            n, n_tls, warm = counts["mysql"], counts["mysql_tls"], counts["warm"]
            try:
                ours = measure(ours_cycle("mysql", engine, ns), iterations=n_tls, warmup=warm)
                ours_no_tls = measure(ours_cycle("mysql", no_tls, ns), iterations=n, warmup=warm)
                raw_open = measure(open_floor, iterations=counts["raw"], warmup=warm)
                raw_fresh = measure(fresh_floor, iterations=n_tls, warmup=warm)
                raw_fresh_no_tls = measure(
                    lambda: fresh_floor(ssl_disabled=True), iterations=n, warmup=warm
                )
            finally:
                raw_conn.close()
            parts.append(
                (
                    "MariaDB: pymysql.connect() + close(), defaults (TLS 'preferred')",
                    measure(
                        lambda: pymysql.connect(**mysql_params(url)).close(),
                        iterations=n_tls,
                        warmup=warm,
                    ),
                )
            )
            parts.append(
                (
                    "MariaDB: ssl.create_default_context() (PyMySQL does it per connection)",
                    measure(ssl.create_default_context, iterations=n_tls, warmup=warm),
                )
            )
            parts.append(
                (
                    "MariaDB: pymysql.connect(ssl_disabled=True) + close()",
                    measure(
                        lambda: pymysql.connect(**mysql_params(url, ssl_disabled=True)).close(),
                        iterations=n,
                        warmup=warm,
                    ),
                )
            )
            plain = measure(
                plain_noop(engine, envs.plain),
                iterations=counts["plain"],
                warmup=3,
                after=restore_sys_path(saved),
            )
        finally:
            sys.path[:] = saved
            engine.dispose()
            no_tls.dispose()
            _state.reset()
    group = f"3. lock acquire+release: MariaDB ({masked(url)})"
    name = "MigrationLock(MySQLLock)"
    name_no_tls = "MigrationLock(MySQLLock), ssl_disabled"
    target = TARGETS_NS["mysql"]
    return [
        Row(group, name, ours, "raw GET_LOCK+RELEASE_LOCK, open conn", raw_open, target),
        Row(group, name, ours, "raw: new PyMySQL conn + GET/RELEASE_LOCK", raw_fresh, target),
        Row(group, name, ours, "plain Alembic no-op upgrade (context)", plain, target),
        Row(
            group,
            name_no_tls,
            ours_no_tls,
            "raw: new conn (ssl_disabled) + GET/RELEASE",
            raw_fresh_no_tls,
            target,
            note="engine created with connect_args={'ssl_disabled': True}: PyMySQL 1.2 "
            "otherwise builds a TLS context (loading the CA store) for every connection",
        ),
    ]


def main() -> None:
    """Measure, print the table."""
    args = parse_args(__doc__ or "")
    q = args.quick
    counts = {
        "pg": scaled(200, q),
        "mysql": scaled(200, q),
        "mysql_tls": scaled(30, q),
        "redis": scaled(300, q),
        "raw": scaled(1_000, q),
        "plain": scaled(30, q),
        "warm": scaled(20, q),
    }
    parts: Components = []
    rows = pg_and_redis(counts, parts) + mysql_rows(counts, parts)
    order = {"PostgreSQL": 0, "MariaDB": 1, "Redis": 2}
    rows.sort(key=lambda r: next(v for k, v in order.items() if k in r.group))
    parts.sort(key=lambda p: next(v for k, v in order.items() if p[0].startswith(k)))
    extra = [
        f"iterations: ours {counts['pg']} (PostgreSQL), {counts['mysql_tls']} (MariaDB, "
        f"PyMySQL defaults), {counts['mysql']} (MariaDB, ssl_disabled), {counts['redis']} "
        f"(Redis); raw open-connection floors {counts['raw']}; raw new-connection floors as "
        f"many as ours; plain no-op upgrade {counts['plain']}; each after {counts['warm']} "
        "warm-up cycles (plain: 3).",
        "Ours opens a dedicated lock connection (PostgreSQL, MariaDB) on every acquire and "
        "closes it on release, as the runner does; Redis reuses the process's client.",
    ]
    report(
        "uncontended lock acquire + release",
        rows,
        json_path=args.json,
        extra=extra,
        components=parts,
    )


if __name__ == "__main__":
    main()
