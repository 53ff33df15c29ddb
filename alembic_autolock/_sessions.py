"""Migration sessions: tagging their statements, and dealing with the ones a dead holder left.

When a holder process dies, its lock connection closes at once and the lock is free, but the
server session of its *migration* connection may still be running the statement in flight (a
long CREATE INDEX, a pg_sleep) until it next talks to the dead client. The next holder must not
migrate beside it. So every statement a migration connection sends starts with the comment
``/* autolock:migrate:<key>:<pid>@<host> */``, and after taking the lock a holder looks for
server sessions of this database that are running (or, on PostgreSQL, are idle inside a
transaction after) such a statement of its namespace; it waits up to ``orphan_wait`` seconds
for them to end, then terminates them (``pg_terminate_backend`` / ``KILL``), with an event
either way.

The tag is on each statement, not on the session, so it cannot outlive the statement: behind a
transaction-pooling proxy (PgBouncer) a server session that served our migration and then
serves another client is not mistaken for ours. On PostgreSQL 14+ the migration session also
gets ``client_connection_check_interval = 1s``, so an orphan usually ends by itself within a
second. That setting is committed before Alembic sees the connection, so Alembic still owns
its transactions.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import _events as events
from .locks import owner_tag
from .locks._session import side_connection

ORPHAN_WAITING = "orphan.waiting"
ORPHAN_GONE = "orphan.gone"
ORPHAN_TERMINATED = "orphan.terminated"


def _key_hint(namespace: str) -> str:
    from .locks.postgresql import advisory_key

    return f"{advisory_key(namespace) & 0xFFFFFFFF:08x}"


def _prefix(namespace: str) -> str:
    return f"/* autolock:migrate:{_key_hint(namespace)}:"


def tags_sessions(engine: Engine) -> bool:
    return engine.dialect.name in ("postgresql", "mysql", "mariadb")


def tag(conn: Connection, namespace: str, *, session_settings: bool = True) -> None:
    """Prefix every statement ``conn`` sends with this namespace's migration comment (and, with
    ``session_settings``, let PostgreSQL 14+ notice a dead client during a statement)."""
    comment = f"{_prefix(namespace)}{os.getpid()}@{socket.gethostname()[:40]} */ "

    def add_comment(
        conn: Connection, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        return comment + statement, params

    event.listen(conn, "before_cursor_execute", add_comment, retval=True)
    version = conn.dialect.server_version_info or (0,)
    if session_settings and conn.dialect.name == "postgresql" and version >= (14,):
        conn.execute(text("SELECT set_config('client_connection_check_interval', '1s', false)"))
        conn.commit()


# Sessions running one of our statements, or idle inside the transaction one of them ran in.
_PG_ORPHANS = text(
    """
    SELECT pid, state FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')
      AND left(query, length(:prefix)) = :prefix
    """
)

_MYSQL_ORPHANS = text(
    "SELECT ID FROM information_schema.PROCESSLIST "
    "WHERE ID <> CONNECTION_ID() AND LEFT(INFO, CHAR_LENGTH(:prefix)) = :prefix"
)


def _orphans(side: Connection, namespace: str) -> list[tuple[int, str]]:
    prefix = _prefix(namespace)
    if side.dialect.name == "postgresql":
        rows = side.execute(_PG_ORPHANS, {"prefix": prefix}).all()
        return [(int(r.pid), f"pid {r.pid} ({r.state})") for r in rows]
    rows = side.execute(_MYSQL_ORPHANS, {"prefix": prefix}).all()
    return [(int(r.ID), f"connection {r.ID}") for r in rows]


def _terminate(side: Connection, session: int) -> None:
    if side.dialect.name == "postgresql":
        side.execute(text("SELECT pg_terminate_backend(:p)"), {"p": session})
    else:
        with contextlib.suppress(DBAPIError):  # it may have ended between the look and the kill
            side.execute(text("KILL :p"), {"p": session})


def reap_orphans(engine: Engine, namespace: str, wait: float) -> list[str]:
    """Wait up to ``wait`` seconds for orphaned migration sessions, then terminate them.

    Called while holding the lock, before migrating. Returns the sessions that were found.
    """
    if not tags_sessions(engine):
        return []
    with side_connection(engine, tag=owner_tag("look", _key_hint(namespace))) as side:
        found = _orphans(side, namespace)
        if not found:
            return []
        described = [d for _, d in found]
        events.emit(ORPHAN_WAITING, "warning", namespace=namespace, sessions=described, wait_s=wait)
        deadline = time.monotonic() + wait
        while found and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            found = _orphans(side, namespace)
        if not found:
            events.emit(ORPHAN_GONE, namespace=namespace, sessions=described)
            return described
        for session, description in found:
            events.emit(ORPHAN_TERMINATED, "warning", namespace=namespace, session=description)
            _terminate(side, session)
        end = time.monotonic() + 10
        while _orphans(side, namespace) and time.monotonic() < end:
            time.sleep(0.05)
        return described
