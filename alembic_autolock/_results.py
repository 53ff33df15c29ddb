"""What the library answers with: the result of a call, the state of a database, who holds a
lock. Plain data, imported by everything, importing nothing heavy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Holder:
    """Who holds (or waits for) a lock, as far as the backend can tell.

    ``role`` is ``lock`` (holds the migration lock), ``wait`` (the designated waiter) or
    ``fence`` (the migration session of a holder, which holds the fence while it migrates).
    """

    backend: str
    waiting: bool = False
    session: str | None = None
    owner: str | None = None
    client: str | None = None
    since: datetime | None = None
    ttl_s: float | None = None
    since_is_last_activity: bool = False
    session_id: int | None = None
    owner_kind: str = "owner"
    role: str = "lock"

    def describe(self) -> str:
        parts = [self.session] if self.session else []
        if self.owner:
            parts.append(f"{self.owner_kind} {self.owner!r}")
        if self.client:
            parts.append(f"client {self.client}")
        if self.since is not None:
            age = (datetime.now(UTC) - self.since).total_seconds()
            stamp = f"{self.since.isoformat(timespec='seconds')} ({age:.1f}s ago)"
            if self.since_is_last_activity:
                parts.append(f"last active at {stamp}")
            else:
                doing = {"lock": "holding", "wait": "waiting", "fence": "migrating"}[self.role]
                parts.append(f"{'waiting' if self.waiting else doing} since {stamp}")
        if self.ttl_s is not None:
            parts.append(f"expires in {self.ttl_s:.1f}s unless renewed")
        return ", ".join(parts) or f"an unidentified {self.backend} session"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"] = self.since.isoformat() if self.since else None
        return data


@dataclass(frozen=True)
class PendingRevision:
    """A revision not yet applied. ``manual``: start-up leaves it for a job (it is marked
    ``autolock_manual = True``, or comes after one that is)."""

    revision: str
    message: str | None
    manual: bool = False


@dataclass(frozen=True)
class MigrationResult:
    """What one call did.

    ``action`` is one of ``cached`` (answered from the in-process cache), ``current`` (already
    at the target, nothing applied), ``upgraded``, ``downgraded``, ``created`` (an empty
    database built from the models and stamped at head: ``empty_database = create_all``;
    ``applied`` lists the stamped revisions), ``ahead`` (the database is at a revision these
    scripts do not know; nothing touched) or ``skipped`` (mode = off).

    ``pending`` lists what start-up left for an operator's job: revisions marked
    ``autolock_manual = True`` and those that come after them (``command`` applies them).
    """

    action: str
    applied: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    waited_s: float = 0.0
    elapsed_s: float = 0.0
    pending: tuple[PendingRevision, ...] = ()
    command: str | None = None


@dataclass(frozen=True)
class Status:
    """The database's migration state, the scripts' heads, and the lock."""

    current_heads: tuple[str, ...]
    script_heads: tuple[str, ...]
    pending: tuple[PendingRevision, ...]
    at_head: bool
    unknown_heads: tuple[str, ...]
    lock_backend: str
    namespace: str
    holders: tuple[Holder, ...] = ()
    holders_error: str | None = None
    database: str = ""
    mode: str = "upgrade"
    environment: str = "development"

    @property
    def ahead(self) -> bool:
        return bool(self.unknown_heads)

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "current_heads": list(self.current_heads),
            "script_heads": list(self.script_heads),
            "at_head": self.at_head,
            "ahead": self.ahead,
            "unknown_heads": list(self.unknown_heads),
            "pending": [
                {"revision": p.revision, "message": p.message, "manual": p.manual}
                for p in self.pending
            ],
            "lock": {
                "backend": self.lock_backend,
                "namespace": self.namespace,
                "holders": [h.as_dict() for h in self.holders],
                "error": self.holders_error,
            },
            "mode": self.mode,
            "environment": self.environment,
        }
