"""MySQL and MariaDB: user-level locks (``GET_LOCK``).

As for PostgreSQL (see ``_session.py`` and ``postgresql.py``), three locks per namespace:

* the **lock**, held by the holder's lock session;
* the **designation**, held by at most one waiting process, which then waits for the lock inside
  the server (``GET_LOCK(name, slice)`` in slices of at most 0.25 s), so it wakes as soon as the
  lock is released; every other waiter holds no session;
* the **fence**, held by the holder's migration session for the whole run
  (:class:`MySQLFence`).

MySQL tells who holds a user-level lock only as a connection id, and MariaDB (whose
performance_schema is off by default) cannot tell more about that connection than its user and
client address. So the holder's lock session also records, in the table
``alembic_autolock_holders`` of its database, its connection id, its client address as the
server sees it, its process and host and since when it holds the lock (best effort: without the
privilege to create the table, holders are described by connection and client only). A row
describes a holder only while that connection id still holds the lock from that same client
address, so a stale row (a holder that died, a server restarted) never names the wrong process.

The server frees a user-level lock when its session ends, so a dead holder never blocks anyone
for longer than it takes the server to notice the closed socket. Lock names are limited to 64
characters and are server-wide (not per database), so each name is ``autolock:`` and a hash of
the namespace (which includes the database name) and the role.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .._db import first_line
from . import Backoff, Holder, cannot_unlock
from ._session import DatabaseFence, SessionLock, side_connection


def lock_name(namespace: str) -> str:
    """A server-wide lock name of at most 64 characters for ``namespace``."""
    return "autolock:" + hashlib.blake2b(namespace.encode(), digest_size=20).hexdigest()


def lock_names(namespace: str) -> tuple[str, str, str]:
    """(lock, designation, fence) names of ``namespace``."""
    return (
        lock_name(namespace),
        lock_name(namespace + "\x00wait"),
        lock_name(namespace + "\x00fence"),
    )


_OWNERS_SQL = text(
    "SELECT IS_USED_LOCK(:lock) AS lock_owner, IS_USED_LOCK(:wait) AS wait_owner, "
    "IS_USED_LOCK(:fence) AS fence_owner, CONNECTION_ID() AS me"
)
_PROCESS_SQL = text(
    "SELECT ID, USER, HOST, TIME, INFO FROM information_schema.PROCESSLIST WHERE ID = :id"
)
HOLDERS_TABLE = "alembic_autolock_holders"
_CREATE_HOLDERS_SQL = text(
    f"CREATE TABLE IF NOT EXISTS {HOLDERS_TABLE} (connection_id BIGINT NOT NULL PRIMARY KEY, "
    "client VARCHAR(255) NOT NULL, process VARCHAR(255) NOT NULL, since DOUBLE NOT NULL)"
)
_REGISTER_SQL = text(
    "REPLACE INTO alembic_autolock_holders (connection_id, client, process, since) "
    "SELECT ID, HOST, :process, :since FROM information_schema.PROCESSLIST "
    "WHERE ID = CONNECTION_ID()"
)
_FORGET_SQL = text("DELETE FROM alembic_autolock_holders WHERE connection_id = CONNECTION_ID()")
_LOOKUP_SQL = text(
    "SELECT client, process, since FROM alembic_autolock_holders WHERE connection_id = :id"
)
_GET_SQL = text("SELECT GET_LOCK(:name, :wait)")
_RELEASE_SQL = text("SELECT RELEASE_LOCK(:name)")


class MySQLLock(SessionLock):
    name = "mysql"
    blocks_in_server = True

    def __init__(self, engine: Engine, namespace: str, *, lock_url: str | None = None) -> None:
        super().__init__(engine, namespace, lock_url=lock_url)
        self.lock_name, self.wait_name, self.fence_name = lock_names(namespace)
        self._conn_id: int | None = None

    def _try(self, conn: Connection) -> tuple[bool, bool]:
        if conn.execute(_GET_SQL, {"name": self.lock_name, "wait": 0}).scalar() == 1:
            self._conn_id = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
            return True, False
        waiter = conn.execute(_GET_SQL, {"name": self.wait_name, "wait": 0}).scalar() == 1
        return False, waiter

    def _try_lock(self, conn: Connection, wait: float) -> bool:
        got = conn.execute(_GET_SQL, {"name": self.lock_name, "wait": round(wait, 3)}).scalar()
        if got != 1:
            return False
        conn.execute(_RELEASE_SQL, {"name": self.wait_name})
        self._conn_id = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
        return True

    def _drop_designation(self, conn: Connection) -> None:
        conn.execute(_RELEASE_SQL, {"name": self.wait_name})

    def _unlock(self, conn: Connection) -> None:
        conn.execute(_RELEASE_SQL, {"name": self.lock_name})
        with contextlib.suppress(DBAPIError):
            conn.execute(_FORGET_SQL)

    def _on_got(self, conn: Connection) -> None:
        """Say who holds the lock (see the module docstring); best effort."""
        try:
            conn.execute(_CREATE_HOLDERS_SQL)
            conn.execute(
                _REGISTER_SQL,
                {
                    "process": f"process {os.getpid()} on {socket.gethostname()}",
                    "since": time.time(),
                },
            )
        except DBAPIError:  # no privilege to create or write it, no database selected
            if conn.in_transaction():
                conn.rollback()

    def lost(self) -> str | None:
        if self._conn is None or not self._held:
            return "the lock was never acquired or already released"
        if self._conn.invalidated:
            return "the lock connection was closed (the server ended the lock session)"
        try:
            owner = self._conn.execute(
                text("SELECT IS_USED_LOCK(:name)"), {"name": self.lock_name}
            ).scalar()
        except SQLAlchemyError as exc:
            return f"the lock connection failed: {first_line(exc)}"
        if owner is None or int(owner) != self._conn_id:
            return f"GET_LOCK({self.lock_name!r}) is no longer held by this session"
        return None

    def _holders(self, conn: Connection) -> list[Holder]:
        return holders_on(conn, self.lock_name, self.wait_name, self.fence_name)

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        found = [h for h in self.holders() if not h.waiting]
        if not found:
            return []
        if not force:
            raise cannot_unlock(
                self.name,
                found,
                "a user-level lock is released when its session ends; pass --force to end "
                "that session (KILL), and the migration session that holds the fence with it",
            )
        with side_connection(self.engine, self._lock_engine) as conn:
            for holder in found:
                with contextlib.suppress(DBAPIError):  # it may have ended meanwhile
                    conn.execute(text("KILL :id"), {"id": holder.session_id})
            backoff = Backoff(5)
            while any(not h.waiting for h in self._holders(conn)) and backoff.sleep():
                pass
        return found


def holders_on(conn: Connection, lock: str, wait: str, fence: str) -> list[Holder]:
    row = conn.execute(_OWNERS_SQL, {"lock": lock, "wait": wait, "fence": fence}).one()
    found = []
    for role, owner in (
        ("lock", row.lock_owner),
        ("fence", row.fence_owner),
        ("wait", row.wait_owner),
    ):
        if owner is None or int(owner) == int(row.me):
            continue
        process = conn.execute(_PROCESS_SQL, {"id": int(owner)}).mappings().first()
        registered = _registered(conn, int(owner)) if role == "lock" else None
        found.append(_holder(int(owner), process, role=role, registered=registered))
    return found


def _registered(conn: Connection, owner: int) -> Any:
    """What the holder recorded about itself (None if nothing, or no such table)."""
    try:
        return conn.execute(_LOOKUP_SQL, {"id": owner}).mappings().first()
    except DBAPIError:
        if conn.in_transaction():
            conn.rollback()
        return None


class MySQLFence(DatabaseFence):
    """The fence: ``GET_LOCK`` held by the migration session itself for the whole run."""

    name = "mysql"
    privilege_hint = "KILL needs the CONNECTION ADMIN or SUPER privilege"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.lock_name, self.wait_name, self.fence_name = lock_names(namespace)

    def _try(self, conn: Connection, role_name: str | None) -> bool:
        return bool(conn.execute(_GET_SQL, {"name": self.fence_name, "wait": 0}).scalar() == 1)

    def _release_statement(self) -> tuple[Any, dict[str, Any]]:
        return _RELEASE_SQL, {"name": self.fence_name}

    def holders(self, conn: Connection) -> list[Holder]:
        found = holders_on(conn, self.lock_name, self.wait_name, self.fence_name)
        return [h for h in found if h.role == "fence"]

    def _end_one(self, conn: Connection, holder: Holder) -> None:
        conn.execute(text("KILL :id"), {"id": holder.session_id})


def _holder(owner: int, row: Any, *, role: str, registered: Any = None) -> Holder:
    if row is None:
        return Holder(backend="mysql", session=f"connection {owner}", session_id=owner, role=role)
    host = str(row["HOST"] or "")
    waiting = role == "wait"
    if registered is not None and str(registered["client"]) == host:
        # the holder's own record, from the same connection and client address
        return Holder(
            backend="mysql",
            role=role,
            session=f"connection {owner}, {registered['process']}",
            session_id=owner,
            owner=str(row["USER"]),
            owner_kind="user",
            client=host or None,
            since=datetime.fromtimestamp(float(registered["since"]), UTC),
        )
    return Holder(
        backend="mysql",
        waiting=waiting,
        role=role,
        session=f"connection {owner}",
        session_id=owner,
        owner=str(row["USER"]),
        owner_kind="user",
        client=host or None,
        # MySQL exposes no lock time: TIME is how long the session has been in its current
        # state (for a holder: since it last checked the lock)
        since=None if waiting else datetime.now(UTC) - timedelta(seconds=int(row["TIME"] or 0)),
        since_is_last_activity=True,
    )
