"""Migration sessions: tagging them, and dealing with the ones a dead holder left behind.

When a holder process dies, its lock connection closes at once and the lock is free, but the
server session of its *migration* connection may still be running the statement in flight (a
long CREATE INDEX, a pg_sleep) until it next talks to the dead client. The next holder must not
migrate beside it. So every migration session is tagged, and after taking the lock a holder
looks for tagged sessions of its namespace other than its own, waits up to ``orphan_wait``
seconds for them to end, then terminates them (``pg_terminate_backend`` / ``KILL``), with an
event either way.

* PostgreSQL: ``application_name = autolock:migrate:<key>:<pid>:<time>:<host>``; PostgreSQL 14+
  also gets ``client_connection_check_interval = 1s`` so an orphan usually ends by itself.
* MySQL/MariaDB: the migration session holds a second user-level lock, ``<lock name>:m``; whoever
  holds it while we hold the main lock is an orphan (``IS_USED_LOCK`` names its connection).

Tags are set and committed before Alembic sees the connection, so Alembic still owns its
transactions.
"""

from __future__ import annotations

import contextlib
import time

from sqlalchemy import text
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


def _marker(namespace: str) -> str:
    from .locks.mysql import lock_name

    return lock_name(namespace) + ":m"


def tags_sessions(engine: Engine) -> bool:
    return engine.dialect.name in ("postgresql", "mysql", "mariadb")


def tag(conn: Connection, namespace: str) -> None:
    """Mark ``conn`` as this namespace's migration session, then commit."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.execute(
            text("SELECT set_config('application_name', :n, false)"),
            {"n": owner_tag("migrate", _key_hint(namespace))},
        )
        version = conn.dialect.server_version_info or (0,)
        if version >= (14,):
            conn.execute(text("SELECT set_config('client_connection_check_interval', '1s', false)"))
    elif dialect in ("mysql", "mariadb"):
        conn.execute(text("SELECT GET_LOCK(:m, 0)"), {"m": _marker(namespace)})
    else:
        return
    conn.commit()


def untag(conn: Connection, namespace: str) -> None:
    """Give up the MySQL marker lock before the session closes (closing is asynchronous)."""
    if conn.dialect.name in ("mysql", "mariadb"):
        try:
            conn.execute(text("SELECT RELEASE_LOCK(:m)"), {"m": _marker(namespace)})
            conn.commit()
        except DBAPIError:
            pass  # the session is gone, and the marker with it


_PG_ORPHANS = text(
    """
    SELECT pid, state, application_name FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND application_name LIKE :pattern AND state <> 'idle'
    """
)


def _orphans(side: Connection, namespace: str) -> list[tuple[int, str]]:
    if side.dialect.name == "postgresql":
        pattern = "autolock:migrate:" + _key_hint(namespace) + ":%"
        rows = side.execute(_PG_ORPHANS, {"pattern": pattern}).all()
        return [(int(r.pid), f"pid {r.pid} ({r.application_name}, {r.state})") for r in rows]
    owner = side.execute(text("SELECT IS_USED_LOCK(:m)"), {"m": _marker(namespace)}).scalar()
    return [] if owner is None else [(int(owner), f"connection {owner}")]


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
