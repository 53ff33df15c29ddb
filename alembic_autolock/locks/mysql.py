"""MySQL and MariaDB: a user-level lock (``GET_LOCK``) on a dedicated connection.

As for PostgreSQL, the lock connection is made like the application's connections, outside its
pool, and closed after release (``_session.py``); the server frees a user-level lock when its
session ends, so a dead holder never blocks anyone for longer than it takes the server to notice
the closed socket. A waiter blocks in the server in slices of at most 0.25 s (``GET_LOCK(name,
slice)``; fractional timeouts are honoured), so it wakes as soon as the lock is released, a sub-
second timeout is exact, and while it waits it is visible in PROCESSLIST (state "User lock").

Lock names are limited to 64 characters and are server-wide (not per database), so the name is
``autolock:`` and a hash of the namespace (which includes the database name).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import Holder, cannot_unlock
from ._session import SessionLock, close, open_side_connection, side_connection


def lock_name(namespace: str) -> str:
    """A server-wide lock name of at most 64 characters for ``namespace``."""
    return "autolock:" + hashlib.blake2b(namespace.encode(), digest_size=20).hexdigest()


_SLICE = 0.25
_OWNER_SQL = text("SELECT IS_USED_LOCK(:name)")

_HOLDER_SQL = text("SELECT ID, USER, HOST, TIME FROM information_schema.PROCESSLIST WHERE ID = :id")

# Waiters are blocked in GET_LOCK('<name>', ...); the name is hex, so LIKE needs no escaping.
_WAITERS_SQL = text(
    "SELECT ID, USER, HOST, TIME FROM information_schema.PROCESSLIST "
    "WHERE INFO LIKE :pattern AND ID <> CONNECTION_ID() ORDER BY TIME DESC"
)


class MySQLLock(SessionLock):
    name = "mysql"
    _unlock_sql = text("SELECT RELEASE_LOCK(:name)")

    def __init__(self, engine: Engine, namespace: str, *, lock_url: str | None = None) -> None:
        super().__init__(engine, namespace, lock_url=lock_url)
        self.lock_name = lock_name(namespace)
        self._conn_id: int | None = None

    def _unlock_params(self) -> dict[str, Any]:
        return {"name": self.lock_name}

    def acquire(self, timeout: float) -> bool:
        if self._conn is None:
            self._conn = open_side_connection(self.engine, self._lock_engine)
            self._conn_id = int(self._conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            got = self._conn.execute(
                text("SELECT GET_LOCK(:name, :wait)"),
                {"name": self.lock_name, "wait": round(min(remaining, _SLICE), 3)},
            ).scalar()
            if got == 1:
                self._held = True
                return True
            if remaining <= 0 or time.monotonic() >= deadline:
                return False

    def lost(self) -> str | None:
        if self._conn is None or not self._held:
            return "the lock was never acquired or already released"
        try:
            owner = self._owner(self._conn)
        except DBAPIError as exc:
            return f"the lock connection failed: {str(exc.orig).strip().splitlines()[0]}"
        if owner != self._conn_id:
            return f"GET_LOCK({self.lock_name!r}) is no longer held by this session"
        return None

    def holders(self) -> list[Holder]:
        conn = self._conn or open_side_connection(self.engine, self._lock_engine)
        try:
            owner = self._owner(conn)
            row = None
            if owner is not None:
                row = conn.execute(_HOLDER_SQL, {"id": owner}).mappings().first()
            waiting = (
                conn.execute(_WAITERS_SQL, {"pattern": f"%GET_LOCK('{self.lock_name}',%"})
                .mappings()
                .all()
            )
        finally:
            if conn is not self._conn:
                close(conn)
        found = [] if owner is None else [_holder(int(owner), row, waiting=False)]
        return found + [_holder(int(w["ID"]), w, waiting=True) for w in waiting if w["ID"] != owner]

    def _owner(self, conn: Connection) -> int | None:
        """The connection id of whoever holds the lock, or None."""
        owner = conn.execute(_OWNER_SQL, {"name": self.lock_name}).scalar()
        return None if owner is None else int(owner)

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        held = [h for h in self.holders() if not h.waiting]
        if not held:
            return []
        if not force:
            raise cannot_unlock(
                self.name,
                held,
                "a user-level lock is released when its session ends; pass --force to end "
                "that session (KILL)",
            )
        with side_connection(self.engine, self._lock_engine) as conn:
            for holder in held:
                with contextlib.suppress(DBAPIError):  # it may have ended meanwhile
                    conn.execute(text("KILL :id"), {"id": holder.session_id})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self._owner(conn) is not None:
                time.sleep(0.05)
        return held


def _holder(owner: int, row: Any, *, waiting: bool) -> Holder:
    if row is None:
        return Holder(backend="mysql", session=f"connection {owner}", session_id=owner)
    host = str(row["HOST"] or "")
    return Holder(
        backend="mysql",
        waiting=waiting,
        session=f"connection {owner}",
        session_id=owner,
        owner=str(row["USER"]),
        owner_kind="user",
        client=host or None,
        # a holder is idle since it last checked the lock; a waiter's TIME restarts with each
        # GET_LOCK slice, so it says nothing about how long it has waited
        since=None if waiting else datetime.now(UTC) - timedelta(seconds=int(row["TIME"] or 0)),
        since_is_last_activity=True,
    )
