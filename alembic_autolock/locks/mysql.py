"""MySQL and MariaDB: a user-level lock (``GET_LOCK``) on a dedicated connection.

As for PostgreSQL, the lock connection is taken from the application's engine, detached from
its pool, and closed after release; the server frees a user-level lock when its session ends,
so a dead holder never blocks anyone for longer than it takes the server to notice the closed
socket. ``GET_LOCK(name, 0)`` is polled with jittered backoff, so sub-second timeouts are exact.

Lock names are limited to 64 characters and are server-wide (not per database), so the name is
``autolock:`` and a hash of the namespace (which includes the database name).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import Backoff, Holder
from .postgresql import lock_engine_for


def lock_name(namespace: str) -> str:
    """A server-wide lock name of at most 64 characters for ``namespace``."""
    return "autolock:" + hashlib.blake2b(namespace.encode(), digest_size=20).hexdigest()


def _open(engine: Engine, lock_engine: Engine | None) -> Connection:
    conn = (lock_engine or engine).connect()
    try:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        if lock_engine is None:
            conn.detach()
    except BaseException:
        conn.invalidate()
        conn.close()
        raise
    return conn


_HOLDER_SQL = text("SELECT ID, USER, HOST, TIME FROM information_schema.PROCESSLIST WHERE ID = :id")


class MySQLLock:
    name = "mysql"

    def __init__(self, engine: Engine, namespace: str, *, lock_url: str | None = None) -> None:
        self.engine = engine
        self.namespace = namespace
        self.lock_name = lock_name(namespace)
        self._lock_engine = lock_engine_for(engine, lock_url)
        self._conn: Connection | None = None
        self._conn_id: int | None = None
        self._held = False

    def acquire(self, timeout: float) -> bool:
        if self._conn is None:
            self._conn = _open(self.engine, self._lock_engine)
            self._conn_id = int(self._conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
        backoff = Backoff(timeout)
        while True:
            got = self._conn.execute(text("SELECT GET_LOCK(:name, 0)"), {"name": self.lock_name})
            if got.scalar() == 1:
                self._held = True
                return True
            if not backoff.sleep():
                return False

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._held:
                conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": self.lock_name})
        except DBAPIError:
            pass  # the session is gone, and its lock with it
        finally:
            self._held = False
            conn.invalidate()
            conn.close()

    def lost(self) -> str | None:
        if self._conn is None or not self._held:
            return "the lock was never acquired or already released"
        try:
            owner = self._conn.execute(
                text("SELECT IS_USED_LOCK(:name)"), {"name": self.lock_name}
            ).scalar()
        except DBAPIError as exc:
            return f"the lock connection failed: {str(exc.orig).strip().splitlines()[0]}"
        if owner != self._conn_id:
            return f"GET_LOCK({self.lock_name!r}) is no longer held by this session"
        return None

    def holders(self) -> list[Holder]:
        conn = self._conn or _open(self.engine, self._lock_engine)
        try:
            owner = conn.execute(
                text("SELECT IS_USED_LOCK(:name)"), {"name": self.lock_name}
            ).scalar()
            if owner is None:
                return []
            row = conn.execute(_HOLDER_SQL, {"id": owner}).mappings().first()
        finally:
            if conn is not self._conn:
                conn.invalidate()
                conn.close()
        return [_holder(int(owner), row)]


def _holder(owner: int, row: Any) -> Holder:
    if row is None:
        return Holder(backend="mysql", session=f"connection {owner}")
    host = str(row["HOST"] or "")
    return Holder(
        backend="mysql",
        session=f"connection {owner}",
        owner=str(row["USER"]),
        client=host or None,
        since=datetime.now(UTC) - timedelta(seconds=int(row["TIME"] or 0)),
        since_is_last_activity=True,
    )
