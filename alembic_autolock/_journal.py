"""The journal: a revision that may have half-run is never re-run blindly.

A revision that runs inside a transaction cannot half-run: if its process dies or it fails, the
database rolls all of it back, and the version table says it was not applied. A revision that
runs outside one (MySQL and MariaDB DDL, SQLite, PostgreSQL's ``autocommit_block()``, a
connection in AUTOCOMMIT) can: part of its work may be committed while the version table still
says it was not applied. So before such a revision starts, the holder writes a row to this
journal, on a connection of its own (committed at once, whatever the migration connection does),
and marks the row finished when the revision's step is done; a failure marks it failed.

After taking the lock and the fence, the next holder reads the latest open row of its namespace.
A row whose revision the version table shows as done (the holder died between the two commits)
is closed. Any other open row means the revision was interrupted, or failed, outside a
transaction: the run stops with :class:`~alembic_autolock.exceptions.MigrationInterrupted`,
which names the revision, the holder and the time, until an operator says what state it left
(``alembic-autolock resolve REV --applied | --not-applied``).

The table, ``alembic_autolock_journal`` in the version table's schema, is created on first use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    desc,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from . import _events as events
from .exceptions import MigrationInterrupted

TABLE = "alembic_autolock_journal"

STARTED, FINISHED, FAILED = "started", "finished", "failed"
# a row that only records how long a revision took, written after its run committed
TIMED = "timed"
RESOLVED_APPLIED, RESOLVED_NOT_APPLIED = "resolved-applied", "resolved-not-applied"
OPEN = (STARTED, FAILED)


def journal_table(schema: str | None) -> Table:
    return Table(
        TABLE,
        MetaData(schema=schema),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("lock_key", String(32), nullable=False, index=True),
        Column("revision", String(255), nullable=False),
        Column("direction", String(10), nullable=False),
        Column("state", String(24), nullable=False),
        Column("holder", String(255), nullable=False),
        Column("started_at", DateTime(), nullable=False),
        Column("finished_at", DateTime(), nullable=True),
        Column("detail", String(500), nullable=True),
        Column("duration_s", Float(), nullable=True),
    )


def holder_id() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"pid {os.getpid()} on {socket.gethostname()} ({program})"[:255]


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Entry:
    id: int
    revision: str
    direction: str
    state: str
    holder: str
    started_at: datetime
    detail: str | None


class Journal:
    """The journal of one namespace, written on an AUTOCOMMIT connection that ``connection()``
    returns (the lock's own session where the lock lives in the database)."""

    def __init__(
        self, connection: Callable[[], Connection], *, key: str, schema: str | None
    ) -> None:
        self._connection = connection
        self.key = key
        self.table = journal_table(schema)
        self._created = False

    def connection(self) -> Connection:
        return self._connection()

    def latest_open(self) -> Entry | None:
        """The newest started or failed entry of this namespace, if any."""
        t = self.table
        query = (
            select(t)
            .where(and_(t.c.lock_key == self.key, t.c.state.in_(OPEN)))
            .order_by(desc(t.c.id))
            .limit(1)
        )
        conn = self.connection()
        try:
            row = conn.execute(query).mappings().first()
        except DBAPIError:  # no journal table yet: nothing ever ran outside a transaction
            _end_failed_statement(conn)
            return None
        self._created = True
        if row is None:
            return None
        return Entry(
            id=row["id"],
            revision=row["revision"],
            direction=row["direction"],
            state=row["state"],
            holder=row["holder"],
            started_at=row["started_at"],
            detail=row["detail"],
        )

    def check(self, applied: Callable[[str, str], bool], *, resolve_hint: str) -> None:
        """Raise MigrationInterrupted if a revision was left half-run; close entries whose
        revision the database shows as done. ``applied(revision, direction)`` says whether the
        version table shows that step as done."""
        entry = self.latest_open()
        if entry is None:
            return
        if applied(entry.revision, entry.direction):
            self._set(
                entry.id,
                FINISHED,
                detail="closed by the next holder: the version table shows it done",
            )
            return
        events.emit(
            events.MIGRATION_INTERRUPTED,
            "error",
            revision=entry.revision,
            direction=entry.direction,
            holder=entry.holder,
            started_at=entry.started_at.isoformat(),
            state=entry.state,
        )
        raise MigrationInterrupted(
            revision=entry.revision,
            direction=entry.direction,
            holder=entry.holder,
            started_at=entry.started_at,
            failed=entry.state == FAILED,
            detail=entry.detail,
            command=resolve_hint,
        )

    def start(self, revision: str, direction: str, detail: str | None = None) -> int:
        conn = self.connection()
        if not self._created:
            self.table.create(conn, checkfirst=True)
            self._created = True
        result = conn.execute(
            insert(self.table).values(
                lock_key=self.key,
                revision=revision,
                direction=direction,
                state=STARTED,
                holder=holder_id(),
                started_at=_now(),
                detail=detail,
            )
        )
        key = result.inserted_primary_key
        return int(key[0]) if key else 0

    def record_durations(self, durations: dict[str, float], direction: str) -> None:
        """How long each revision of a committed run took (for ``time_budget``)."""
        if not durations:
            return
        conn = self.connection()
        if not self._created:
            self.table.create(conn, checkfirst=True)
            self._created = True
        now, holder = _now(), holder_id()
        conn.execute(
            insert(self.table),
            [
                {
                    "lock_key": self.key,
                    "revision": revision,
                    "direction": direction,
                    "state": TIMED,
                    "holder": holder,
                    "started_at": now,
                    "finished_at": now,
                    "duration_s": round(seconds, 4),
                }
                for revision, seconds in durations.items()
            ],
        )

    def durations(self) -> dict[str, float]:
        """The longest recorded upgrade duration of each revision, in this namespace."""
        t = self.table
        query = (
            select(t.c.revision, func.max(t.c.duration_s))
            .where(
                and_(
                    t.c.lock_key == self.key,
                    t.c.direction == "upgrade",
                    t.c.duration_s.is_not(None),
                )
            )
            .group_by(t.c.revision)
        )
        conn = self.connection()
        try:
            return {rev: float(seconds) for rev, seconds in conn.execute(query)}
        except DBAPIError:  # no journal table yet: nothing recorded
            _end_failed_statement(conn)
            return {}

    def finish(self, entry: int) -> None:
        self._set(entry, FINISHED)

    def close_unapplied(self, entry: int, detail: str) -> None:
        """The revision failed before any of it took effect: nothing to resolve."""
        self._set(entry, RESOLVED_NOT_APPLIED, detail=detail[:500])

    def fail(self, entry: int, detail: str) -> None:
        self._set(entry, FAILED, detail=detail[:500])

    def resolve(self, revision: str, applied: bool) -> list[Entry]:
        """Close the open entries of ``revision``; returns them (none: nothing to resolve)."""
        entries = []
        entry = self.latest_open()
        while entry is not None and entry.revision == revision:
            entries.append(entry)
            self._set(
                entry.id,
                RESOLVED_APPLIED if applied else RESOLVED_NOT_APPLIED,
                detail=f"resolved by {holder_id()}",
            )
            entry = self.latest_open()
        return entries

    def _set(self, entry: int, state: str, detail: str | None = None) -> None:
        values: dict[str, Any] = {"state": state, "finished_at": _now()}
        if detail is not None:
            values["detail"] = detail
        self.connection().execute(
            update(self.table).where(self.table.c.id == entry).values(**values)
        )


def _end_failed_statement(conn: Connection) -> None:
    """After a failed statement on an AUTOCOMMIT connection nothing is left open; on a
    connection in a transaction (SQLite's side connection), end it."""
    if conn.in_transaction():
        with contextlib.suppress(DBAPIError):
            conn.rollback()
