"""PostgreSQL: session advisory locks.

Three keys per namespace, all derived from it (:func:`advisory_key`):

* the **lock**, held by the holder's lock session (AUTOCOMMIT, idle while held, named
  ``autolock:lock:...`` in ``pg_stat_activity``);
* the **designation**, held by at most one waiting process (``autolock:wait:...``), which polls
  the lock from its session so that a release or a dead holder is noticed within milliseconds;
  every other waiter holds no session (see ``_session.py``);
* the **fence**, held by the holder's migration session itself (``autolock:migrate:...``) for the
  whole run (:class:`PostgresFence`).

When a holder dies, PostgreSQL ends its sessions and all three are free at once.

With ``lock_url`` the lock, the designation and the migration session all go to that URL (for
PgBouncer in transaction pooling mode: point lock_url at PostgreSQL directly or at a
session-mode pool; a fence needs a real server session).
"""

from __future__ import annotations

import hashlib
import struct
import time
from datetime import UTC
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from .._db import first_line
from ..exceptions import ConfigError
from . import Backoff, Holder, cannot_unlock, owner_tag, parse_owner_tag
from ._session import DatabaseFence, SessionLock, side_connection


def advisory_key(namespace: str) -> int:
    """A stable signed 64-bit key for ``namespace`` (the same in every process and version)."""
    digest = hashlib.blake2b(namespace.encode(), digest_size=8).digest()
    return int(struct.unpack(">q", digest)[0])


def key_hint(namespace: str) -> str:
    """The low 32 bits of the lock key as 8 hex digits, used in session names."""
    return f"{advisory_key(namespace) & 0xFFFFFFFF:08x}"


def keys(namespace: str) -> tuple[int, int, int]:
    """(lock, designation, fence) keys of ``namespace``."""
    return (
        advisory_key(namespace),
        advisory_key(namespace + "\x00wait"),
        advisory_key(namespace + "\x00fence"),
    )


_HOLDERS_SQL = text(
    """
    SELECT l.pid, l.granted, a.application_name, host(a.client_addr) AS client,
           a.backend_start, a.state,
           CASE ((l.classid::bigint << 32) | l.objid::bigint)
             WHEN :key THEN 'lock' WHEN :wkey THEN 'wait' ELSE 'fence' END AS role
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.objsubid = 1
      AND ((l.classid::bigint << 32) | l.objid::bigint) IN (:key, :wkey, :fkey)
      AND l.pid <> pg_backend_pid()
    ORDER BY CASE ((l.classid::bigint << 32) | l.objid::bigint)
               WHEN :key THEN 0 WHEN :fkey THEN 1 ELSE 2 END, a.backend_start
    """
)

# One round trip per attempt. The innermost query (fenced by OFFSET 0) reads this server
# session's marker setting: a fresh session never has it, so if it is set, another client that
# holds (or held without releasing) the lock shares this session, which is what a
# transaction-pooling proxy (PgBouncer) does. Then the lock is tried; failing that, the
# designation; the marker is set if the lock was taken; and the session is named for
# pg_stat_activity: autolock:lock:... or autolock:wait:... (an attempt that got neither keeps
# the application's name: it is one of its connections, given back at once).
_TRY_SQL = text(
    """
    SELECT t.already, t.got, t.waiter, t.pid,
           set_config('application_name',
                      CASE WHEN t.got THEN :lock_name WHEN t.waiter THEN :wait_name
                           ELSE current_setting('application_name') END, false) AS named,
           CASE WHEN t.got THEN set_config(:marker, '1', false) END AS marked
    FROM (SELECT s.already, s.got, s.pid,
                 CASE WHEN s.got THEN false ELSE pg_try_advisory_lock(:wkey) END AS waiter
          FROM (SELECT r.already, r.pid, pg_try_advisory_lock(:key) AS got
                FROM (SELECT coalesce(current_setting(:marker, true), '') = '1' AS already,
                             pg_backend_pid() AS pid
                      OFFSET 0) r
                OFFSET 0) s
          OFFSET 0) t
    """
)

# The designated waiter's poll: the lock; on success the designation is given back.
_TRY_LOCK_SQL = text(
    """
    SELECT t.already, t.got, t.pid,
           CASE WHEN t.got THEN set_config('application_name', :lock_name, false) END AS named,
           CASE WHEN t.got THEN set_config(:marker, '1', false) END AS marked,
           CASE WHEN t.got THEN pg_advisory_unlock(:wkey) END AS undesignated
    FROM (SELECT s.already, s.pid, pg_try_advisory_lock(:key) AS got
          FROM (SELECT coalesce(current_setting(:marker, true), '') = '1' AS already,
                       pg_backend_pid() AS pid
                OFFSET 0) s
          OFFSET 0) t
    """
)

# A session advisory lock ends only with its session or an unlock on that session, and only
# release() unlocks: so the lock is held while the session that took it answers. (pg_locks
# would say so too, but reading it costs a scan of every lock of the server: milliseconds
# during a long migration, whose session holds a lock on every table it creates.)
_STILL_HELD_SQL = text("SELECT pg_backend_pid() AS pid")

POOLER_HINT = (
    "Session advisory locks do not work through PgBouncer (or any pooler) in transaction "
    "pooling mode. Set lock_url to a URL that reaches PostgreSQL directly or through a "
    "session-mode pool, or use lock = redis://..."
)

_UNLOCK_SQL = text("SELECT pg_advisory_unlock(:key), set_config(:marker, '', false)")
_UNLOCK_KEEP_MARKER_SQL = text("SELECT pg_advisory_unlock(:key)")
# Releasing for good: the session (closed next, which the server finishes a moment later) stops
# being named for a role it no longer has, so pg_stat_activity never shows two lock holders.
_LET_GO_SQL = text(
    "SELECT pg_advisory_unlock(:key), set_config(:marker, '', false), "
    "set_config('application_name', '', false)"
)
_LET_GO_KEEP_MARKER_SQL = text(
    "SELECT pg_advisory_unlock(:key), set_config('application_name', '', false)"
)
_TERMINATE_SQL = text("SELECT pg_terminate_backend(:pid)")


class PostgresLock(SessionLock):
    name = "postgresql"

    def __init__(self, engine: Engine, namespace: str, *, lock_url: str | None = None) -> None:
        super().__init__(engine, namespace, lock_url=lock_url)
        self.key, self.wkey, self.fkey = keys(namespace)
        self.key_hint = f"{self.key & 0xFFFFFFFF:08x}"
        self.marker = f"autolock.held_{self.key_hint}"
        self._pid: int | None = None
        self._wait_name = owner_tag("wait", self.key_hint)  # carries when the wait began

    def _try(self, conn: Connection) -> tuple[bool, bool]:
        row = conn.execute(
            _TRY_SQL,
            {
                "key": self.key,
                "wkey": self.wkey,
                "marker": self.marker,
                "lock_name": owner_tag("lock", self.key_hint),
                "wait_name": self._wait_name,
            },
        ).one()
        if row.got and row.already:  # undo our re-entrant grant; the marker is theirs
            conn.execute(_UNLOCK_KEEP_MARKER_SQL, {"key": self.key})
            raise ConfigError(
                "the PostgreSQL lock connection shares its server session (pid "
                f"{row.pid}) with another client that already holds the migration lock. "
                + POOLER_HINT,
                key="lock_url",
            )
        if row.got:
            self._pid = int(row.pid)
        return bool(row.got), bool(row.waiter)

    def _try_lock(self, conn: Connection, wait: float) -> bool:
        row = conn.execute(
            _TRY_LOCK_SQL,
            {
                "key": self.key,
                "wkey": self.wkey,
                "marker": self.marker,
                "lock_name": owner_tag("lock", self.key_hint),
            },
        ).one()
        if row.got and row.already:
            conn.execute(_UNLOCK_KEEP_MARKER_SQL, {"key": self.key})
            raise ConfigError(
                f"the PostgreSQL lock connection shares its server session (pid {row.pid}) "
                "with another client that already holds the migration lock. " + POOLER_HINT,
                key="lock_url",
            )
        if row.got:
            self._pid = int(row.pid)
        return bool(row.got)

    def _drop_designation(self, conn: Connection) -> None:
        conn.execute(_LET_GO_KEEP_MARKER_SQL, {"key": self.wkey})

    def _unlock(self, conn: Connection) -> None:
        conn.execute(_LET_GO_SQL, {"key": self.key, "marker": self.marker})

    def _on_got(self, conn: Connection) -> None:
        if self._lock_engine is None:
            self._refuse_shared_session(conn)

    def _refuse_shared_session(self, conn: Connection) -> None:
        """Refuse the lock if the application's connections are served from its session.

        Two connections straight to PostgreSQL never share a backend pid. Behind a
        transaction-pooling proxy the application's next transaction is served by an idle
        server session, and the lock's session is idle: with a pool of one always (the check
        before the first revision would then wait behind the migration's own transaction until
        the proxy gives up), and with PgBouncer's LIFO reuse usually.
        """
        from .._db import open_connection

        with open_connection(self.engine, deadline=time.monotonic() + 10) as probe:
            pid = probe.execute(text("SELECT pg_backend_pid()")).scalar_one()
        if pid != self._pid:
            return
        conn.execute(_UNLOCK_SQL, {"key": self.key, "marker": self.marker})
        self._held = False
        raise ConfigError(
            f"the PostgreSQL lock was taken in server session (pid {pid}), and the "
            "application's connections are served from that same session. " + POOLER_HINT,
            key="lock_url",
        )

    def lost(self) -> str | None:
        if self._conn is None or not self._held:
            return "the lock was never acquired or already released"
        if self._conn.invalidated:
            return "the lock connection was closed (the server ended the lock session)"
        try:
            row = self._conn.execute(_STILL_HELD_SQL).one()
        except SQLAlchemyError as exc:
            return f"the lock connection failed: {first_line(exc)}"
        if row.pid != self._pid:
            return (
                f"the lock connection now talks to server session {row.pid}, not {self._pid} "
                "that took the lock. " + POOLER_HINT
            )
        return None

    def _holders(self, conn: Connection) -> list[Holder]:
        rows = (
            conn.execute(_HOLDERS_SQL, {"key": self.key, "wkey": self.wkey, "fkey": self.fkey})
            .mappings()
            .all()
        )
        return [_holder(row) for row in rows]

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        found = [h for h in self.holders() if not h.waiting]
        if not found:
            return []
        if not force:
            raise cannot_unlock(
                self.name,
                found,
                "an advisory lock is released when its session ends; pass --force to "
                "terminate that session (pg_terminate_backend), and the migration session that "
                "holds the fence with it",
            )
        with side_connection(self.engine, self._lock_engine) as conn:
            for holder in found:
                conn.execute(_TERMINATE_SQL, {"pid": holder.session_id})
            backoff = Backoff(5)
            while any(not h.waiting for h in self._holders(conn)) and backoff.sleep():
                pass
        return found


class PostgresFence(DatabaseFence):
    """The fence: an advisory lock held by the migration session itself for the whole run."""

    name = "postgresql"
    privilege_hint = "pg_terminate_backend needs the same role or pg_signal_backend"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.key, self.wkey, self.fkey = keys(namespace)

    def _try(self, conn: Connection, role_name: str | None) -> bool:
        row = conn.execute(
            _FENCE_SQL, {"fkey": self.fkey, "name": role_name or "", "named": role_name is not None}
        ).one()
        return bool(row.got)

    def _release_statement(self) -> tuple[Any, dict[str, Any]]:
        return _LET_GO_KEEP_MARKER_SQL, {"key": self.fkey}

    def holders(self, conn: Connection) -> list[Holder]:
        rows = (
            conn.execute(_HOLDERS_SQL, {"key": self.key, "wkey": self.wkey, "fkey": self.fkey})
            .mappings()
            .all()
        )
        return [_holder(row) for row in rows if row["role"] == "fence"]

    def _end_one(self, conn: Connection, holder: Holder) -> None:
        conn.execute(_TERMINATE_SQL, {"pid": holder.session_id})


# The fence, and on a session the library opened: its name, and (PostgreSQL 14+) a check that
# notices a dead client during a long statement, so that an orphan usually ends by itself.
_FENCE_SQL = text(
    """
    SELECT t.got,
           CASE WHEN t.got AND :named THEN set_config('application_name', :name, false) END
             AS named_session,
           CASE WHEN t.got AND :named AND current_setting('server_version_num')::int >= 140000
                THEN set_config('client_connection_check_interval', '1s', false) END AS checked
    FROM (SELECT pg_try_advisory_lock(:fkey) AS got OFFSET 0) t
    """
)


def _holder(row: Any) -> Holder:
    since = parse_owner_tag(row["application_name"])
    if since is None and row["backend_start"] is not None:
        since = row["backend_start"].astimezone(UTC)
    role = row["role"]
    return Holder(
        backend="postgresql",
        waiting=role == "wait",
        role=role,
        session=f"pid {row['pid']}",
        session_id=int(row["pid"]),
        owner=row["application_name"] or None,
        owner_kind="application_name",
        client=row["client"] or "local socket",
        since=since,
    )
