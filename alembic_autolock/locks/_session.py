"""What the PostgreSQL and MySQL backends share: a lock owned by a dedicated database session.

The lock connection is made exactly as the application's engine makes connections (same
creator, connect arguments, dialect and pool events) but from a pool of its own, so it never
takes a connection out of the application's pool. It is detached from that pool at once (so it
never returns to a pool still holding the lock), switched to AUTOCOMMIT (so it sits idle, not
idle in a transaction), and closed after release. With ``lock_url`` it comes from a dedicated
NullPool engine for that URL instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import TextClause

from .. import _state

_SET_NAME_SQL = text("SELECT set_config('application_name', :name, false)")


def lock_engine_for(lock_url: str | None) -> Engine | None:
    """A dedicated NullPool engine for ``lock_url`` (one per URL per process), else None."""
    if lock_url is None:
        return None
    with _state.registry_lock:
        lock_engine = _state.lock_engines.get(lock_url)
        if lock_engine is None:
            lock_engine = create_engine(lock_url, poolclass=NullPool)
            _state.lock_engines[lock_url] = lock_engine
        return lock_engine


def side_engine_for(engine: Engine) -> Engine:
    """An engine that makes connections exactly as ``engine`` does (same creator, connect
    arguments and pool events) from a pool of its own, so that taking a lock connection never
    takes a connection out of the application's pool. One per application engine."""
    with _state.registry_lock:
        side = _state.side_engines.get(engine)
        if side is None:
            # The recreated pool carries the engine's pool events (the dialect's per-connection
            # setup among them); sharing the dialect, rather than create_engine(), adds none.
            side = Engine(engine.pool.recreate(), engine.dialect, engine.url)
            _state.side_engines[engine] = side
        return side


def open_side_connection(
    engine: Engine, lock_engine: Engine | None = None, tag: str | None = None
) -> Connection:
    """A connection outside the application's pool, in AUTOCOMMIT; on PostgreSQL named ``tag``
    in pg_stat_activity."""
    conn = (lock_engine or side_engine_for(engine)).connect()
    try:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        if lock_engine is None:
            conn.detach()  # closed, never returned to the pool
        if tag is not None and conn.dialect.name == "postgresql":
            conn.execute(_SET_NAME_SQL, {"name": tag})
    except BaseException:
        close(conn)
        raise
    return conn


def close(conn: Connection) -> None:
    conn.invalidate()
    conn.close()


@contextmanager
def side_connection(
    engine: Engine, lock_engine: Engine | None = None, tag: str | None = None
) -> Iterator[Connection]:
    conn = open_side_connection(engine, lock_engine, tag)
    try:
        yield conn
    finally:
        close(conn)


class SessionLock:
    """Base of the PostgreSQL and MySQL backends: holds the lock session and releases it."""

    name: str
    _unlock_sql: TextClause

    def __init__(self, engine: Engine, namespace: str, *, lock_url: str | None = None) -> None:
        self.engine = engine
        self.namespace = namespace
        self._lock_engine = lock_engine_for(lock_url)
        self._conn: Connection | None = None
        self._held = False

    def _unlock_params(self) -> dict[str, Any]:
        raise NotImplementedError

    def _forget(self) -> None:
        """Reset per-acquisition state after release."""
        self._held = False

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._held:
                conn.execute(self._unlock_sql, self._unlock_params())
        except SQLAlchemyError:  # DBAPIError, or PendingRollbackError after a failed check
            pass  # the session is gone, and its lock with it
        finally:
            self._forget()
            close(conn)  # a session lock must not outlive this run
