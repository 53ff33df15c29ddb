"""PostgreSQL: a session advisory lock on a dedicated connection.

The lock connection (see ``_session.py``: made like the application's connections, outside its
pool, AUTOCOMMIT, closed after release) is tagged through ``application_name`` so that
``pg_stat_activity`` names the holder (``autolock:lock:...``) and its waiters
(``autolock:wait:...``). The lock is taken by polling ``pg_try_advisory_lock`` with jittered
backoff: a waiter never blocks inside the server, so a timeout is exact and a dead waiter leaves
nothing behind. When the holder dies, PostgreSQL ends its session and the lock is free at once.

With ``lock_url`` the lock connection goes to that URL instead (for PgBouncer in transaction
pooling mode: point lock_url at PostgreSQL directly or at a session-mode pool).
"""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..exceptions import ConfigError
from . import Backoff, Holder, cannot_unlock, owner_tag, parse_owner_tag
from ._session import SessionLock, open_side_connection, side_connection


def advisory_key(namespace: str) -> int:
    """A stable signed 64-bit key for ``namespace`` (the same in every process and version)."""
    digest = hashlib.blake2b(namespace.encode(), digest_size=8).digest()
    return int(struct.unpack(">q", digest)[0])


_HOLDERS_SQL = text(
    """
    SELECT l.pid, l.granted, a.application_name, host(a.client_addr) AS client,
           a.backend_start, a.state
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.objsubid = 1
      AND ((l.classid::bigint << 32) | l.objid::bigint) = :key
      AND l.pid <> pg_backend_pid()
    ORDER BY l.granted DESC, a.backend_start
    """
)

# OFFSET 0 fences the subquery: "already" is read before pg_try_advisory_lock runs. A fresh
# session can only already hold the lock if it is shared with another client, which is what a
# transaction-pooling proxy (PgBouncer) does.
# One round trip per attempt. The innermost query (fenced by OFFSET 0) reads this server
# session's marker setting: a fresh session never has it, so if it is set, another client that
# holds (or held without releasing) the lock shares this session, which is what a
# transaction-pooling proxy (PgBouncer) does. Then the lock is tried; on success the marker is
# set; and the session is named for pg_stat_activity: autolock:lock:... or autolock:wait:...
# (A custom setting costs nothing to read; pg_locks costs a catalog warm-up on a new session.)
_TRY_SQL = text(
    """
    SELECT t.already, t.got, t.pid,
           set_config('application_name',
                      CASE WHEN t.got THEN :lock_name ELSE :wait_name END, false) AS named,
           CASE WHEN t.got THEN set_config(:marker, '1', false) END AS marked
    FROM (SELECT s.already, pg_try_advisory_lock(:key) AS got, s.pid
          FROM (SELECT coalesce(current_setting(:marker, true), '') = '1' AS already,
                       pg_backend_pid() AS pid
                OFFSET 0) s
          OFFSET 0) t
    """
)

_STILL_HELD_SQL = text(
    """
    SELECT EXISTS (SELECT 1 FROM pg_locks
                   WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                     AND objsubid = 1
                     AND ((classid::bigint << 32) | objid::bigint) = :key) AS held,
           pg_backend_pid() AS pid
    """
)

POOLER_HINT = (
    "Session advisory locks do not work through PgBouncer (or any pooler) in transaction "
    "pooling mode. Set lock_url to a URL that reaches PostgreSQL directly or through a "
    "session-mode pool, or use lock = redis://..."
)

_WAITERS_SQL = text(
    """
    SELECT pid, false AS granted, application_name, host(client_addr) AS client, backend_start,
           state
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND application_name LIKE :pattern
    ORDER BY backend_start
    """
)

_UNLOCK_SQL = text("SELECT pg_advisory_unlock(:key), set_config(:marker, '', false)")
_UNLOCK_KEEP_MARKER_SQL = text("SELECT pg_advisory_unlock(:key)")


class PostgresLock(SessionLock):
    name = "postgresql"
    _unlock_sql = _UNLOCK_SQL

    def __init__(self, engine: Engine, namespace: str, *, lock_url: str | None = None) -> None:
        super().__init__(engine, namespace, lock_url=lock_url)
        self.key = advisory_key(namespace)
        self.key_hint = f"{self.key & 0xFFFFFFFF:08x}"
        self.marker = f"autolock.held_{self.key_hint}"
        self._pid: int | None = None

    def _unlock_params(self) -> dict[str, Any]:
        return {"key": self.key, "marker": self.marker}

    def _forget(self) -> None:
        self._held = False
        self._pid = None

    def acquire(self, timeout: float) -> bool:
        if self._conn is None:
            self._conn = open_side_connection(self.engine, self._lock_engine)
        conn = self._conn
        wait_name = self._tag("wait")  # carries the time the wait began
        backoff = Backoff(timeout)
        while True:
            params = {
                "key": self.key,
                "marker": self.marker,
                "lock_name": self._tag("lock"),
                "wait_name": wait_name,
            }
            row = conn.execute(_TRY_SQL, params).one()
            if row.got and row.already:  # undo our re-entrant grant; the marker is theirs
                conn.execute(_UNLOCK_KEEP_MARKER_SQL, {"key": self.key})
                raise ConfigError(
                    "the PostgreSQL lock connection shares its server session (pid "
                    f"{row.pid}) with another client that already holds the migration lock. "
                    + POOLER_HINT,
                    key="lock_url",
                )
            if row.got:
                self._held = True
                self._pid = int(row.pid)
                if self._lock_engine is None:
                    self._refuse_shared_session(conn)
                return True
            if not backoff.sleep():
                return False

    def _refuse_shared_session(self, conn: Connection) -> None:
        """Refuse the lock if the application's connections are served from its session.

        Two connections straight to PostgreSQL never share a backend pid. Behind a
        transaction-pooling proxy the application's next transaction is served by an idle
        server session, and the lock's session is idle: with a pool of one always (the check
        before the first revision would then wait behind the migration's own transaction until
        the proxy gives up), and with PgBouncer's LIFO reuse usually.
        """
        with self.engine.connect() as probe:
            pid = probe.execute(text("SELECT pg_backend_pid()")).scalar_one()
        if pid != self._pid:
            return
        conn.execute(_UNLOCK_SQL, self._unlock_params())
        self._forget()
        raise ConfigError(
            f"the PostgreSQL lock was taken in server session (pid {pid}), and the "
            "application's connections are served from that same session. " + POOLER_HINT,
            key="lock_url",
        )

    def lost(self) -> str | None:
        if self._conn is None or not self._held:
            return "the lock was never acquired or already released"
        try:
            row = self._conn.execute(_STILL_HELD_SQL, {"key": self.key}).one()
        except DBAPIError as exc:
            return f"the lock connection failed: {str(exc.orig).strip().splitlines()[0]}"
        if row.pid != self._pid:
            return (
                f"the lock connection now talks to server session {row.pid}, not {self._pid} "
                "that took the lock. " + POOLER_HINT
            )
        if not row.held:
            return "the advisory lock is no longer held by the lock session"
        return None

    def holders(self) -> list[Holder]:
        if self._conn is not None:
            return self._holders(self._conn)
        with side_connection(self.engine, self._lock_engine, self._tag("look")) as conn:
            return self._holders(conn)

    def _holders(self, conn: Connection) -> list[Holder]:
        rows = conn.execute(_HOLDERS_SQL, {"key": self.key}).mappings().all()
        held = [_holder(row) for row in rows]
        # Waiters poll with pg_try_advisory_lock, so pg_locks does not list them; their lock
        # sessions are named autolock:wait:<key>:... instead.
        pids = {h.session_id for h in held}
        waiting = (
            conn.execute(_WAITERS_SQL, {"pattern": f"autolock:wait:{self.key_hint}:%"})
            .mappings()
            .all()
        )
        return held + [_holder(row, waiting=True) for row in waiting if row["pid"] not in pids]

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        held = [h for h in self.holders() if not h.waiting]
        if not held:
            return []
        if not force:
            raise cannot_unlock(
                self.name,
                held,
                "an advisory lock is released when its session ends; pass --force to "
                "terminate that session (pg_terminate_backend)",
            )
        with side_connection(self.engine, self._lock_engine, self._tag("look")) as conn:
            for holder in held:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": holder.session_id})
            backoff = Backoff(5)
            while any(not h.waiting for h in self._holders(conn)) and backoff.sleep():
                pass
        return held

    def _tag(self, role: str) -> str:
        return owner_tag(role, self.key_hint)


def _holder(row: Any, *, waiting: bool | None = None) -> Holder:
    since = parse_owner_tag(row["application_name"])
    if since is None and row["backend_start"] is not None:
        since = row["backend_start"].astimezone(UTC)
    return Holder(
        backend="postgresql",
        waiting=(not row["granted"]) if waiting is None else waiting,
        session=f"pid {row['pid']}",
        session_id=int(row["pid"]),
        owner=row["application_name"] or None,
        owner_kind="application_name",
        client=row["client"] or "local socket",
        since=since,
    )
