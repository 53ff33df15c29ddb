"""Every error alembic_autolock raises, under one base class.

This module imports nothing from the rest of the package, so it can be imported anywhere (an
env.py, a health check) without pulling in SQLAlchemy or Alembic. Each error carries the data an
operator needs as attributes, and its message says what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AutolockError",
    "ConfigError",
    "DatabaseAhead",
    "DatabaseUnavailable",
    "GateClosed",
    "LockLost",
    "LockTimeout",
    "LockUnavailable",
    "MigrationFailed",
    "PendingMigrations",
]


class AutolockError(Exception):
    """Base class of every error raised by alembic_autolock."""


class ConfigError(AutolockError):
    """A setting, an argument or the Alembic configuration is wrong.

    ``key``, ``value`` and ``source`` say which setting, what it was and where it came from, when
    the error is about one setting.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        value: object = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.value = value
        self.source = source


class DatabaseUnavailable(AutolockError):
    """The database could not be reached. ``url`` is the masked URL (no password)."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


def _describe_holders(holders: Sequence[Any]) -> str:
    granted = [h for h in holders if not getattr(h, "waiting", False)]
    if not granted:
        return "no holder could be identified (it may have released the lock just now)"
    return "held by " + "; ".join(h.describe() for h in granted)


class LockUnavailable(AutolockError):
    """The lock server (Redis) could not be reached; nothing was applied without the lock."""

    def __init__(self, message: str, *, backend: str, url: str) -> None:
        super().__init__(message)
        self.backend = backend
        self.url = url


class LockTimeout(AutolockError):
    """The migration lock was not acquired within the timeout.

    ``holders`` lists who held (and who waited for) the lock when the wait ended.
    """

    def __init__(
        self,
        *,
        backend: str,
        namespace: str,
        waited_s: float,
        timeout_s: float,
        holders: Sequence[Any] = (),
    ) -> None:
        self.backend = backend
        self.namespace = namespace
        self.waited_s = waited_s
        self.timeout_s = timeout_s
        self.holders = tuple(holders)
        super().__init__(
            f"timed out after {waited_s:.1f}s waiting for the {backend} migration lock "
            f"{namespace!r}: {_describe_holders(self.holders)}. Another process is probably "
            "migrating: wait and retry, raise `timeout`, or inspect it with "
            "`alembic-autolock holders`."
        )


class LockLost(AutolockError):
    """The lock stopped being held while migrations ran; nothing after ``revision`` started."""

    def __init__(
        self,
        *,
        backend: str,
        namespace: str,
        reason: str,
        revision: str | None,
        applied: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.namespace = namespace
        self.reason = reason
        self.revision = revision
        self.applied = tuple(applied)
        where = f"stopped before revision {revision}" if revision is not None else "stopped"
        done = ", ".join(self.applied) if self.applied else "none"
        super().__init__(
            f"lost the {backend} migration lock {namespace!r} ({reason}); {where}. Revisions "
            f"applied by this run: {done}. Run the upgrade again: it resumes from the last "
            "committed revision."
        )


class MigrationFailed(AutolockError):
    """A migration raised.

    ``revision`` is the revision that failed (None if env.py failed before any revision started),
    ``applied`` the revisions this run applied before it, ``heads`` the database heads read after
    the failure and ``state`` a sentence describing them. The original exception is ``cause``
    (and ``__cause__``).
    """

    def __init__(
        self,
        *,
        revision: str | None,
        applied: Sequence[str],
        cause: BaseException,
        heads: Sequence[str] | None,
        state: str,
        hint: str = "",
        upgrade: bool = True,
        summary: str | None = None,
    ) -> None:
        self.revision = revision
        self.applied = tuple(applied)
        self.cause = cause
        self.heads = tuple(heads) if heads is not None else None
        self.state = state
        what = (
            f"migration {revision} failed"
            if revision is not None
            else "the migration environment (env.py) failed before any revision ran"
        )
        done = ", ".join(self.applied) if self.applied else "none"
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if summary is not None:
            what, first_line = summary, ""
        message = (
            f"{what}: {type(cause).__name__}: {first_line}. " if first_line else f"{what}. "
        ) + (
            f"{'Applied' if upgrade else 'Undone'} by this run"
            f"{' before it' if revision is not None else ''}: {done}. "
            f"State left behind: {state}."
        )
        if hint:
            message += " " + hint
        super().__init__(message)


class PendingMigrations(AutolockError):
    """Check mode found revisions that are not applied. ``pending`` holds (id, message) pairs."""

    def __init__(
        self,
        *,
        pending: Sequence[tuple[str, str | None]],
        heads: Sequence[str],
        command: str,
    ) -> None:
        self.pending = tuple(pending)
        self.heads = tuple(heads)
        self.command = command
        listed = ", ".join(f"{rev} ({msg})" if msg else rev for rev, msg in self.pending)
        super().__init__(
            f"{len(self.pending)} migration(s) pending: {listed}. This process is in check mode "
            f"and does not migrate; apply them with `{command}`."
        )


class GateClosed(AutolockError):
    """The environment policy refused the action. ``setting`` names what would allow it."""

    def __init__(self, message: str, *, action: str, environment: str, setting: str) -> None:
        super().__init__(message)
        self.action = action
        self.environment = environment
        self.setting = setting


class DatabaseAhead(AutolockError):
    """The database is at revisions these scripts do not know (a newer deploy migrated it)."""

    def __init__(self, *, unknown: Sequence[str], heads: Sequence[str]) -> None:
        self.unknown = tuple(unknown)
        self.heads = tuple(heads)
        super().__init__(
            f"the database is at revision(s) {', '.join(self.unknown)}, which these migration "
            "scripts do not contain: a newer version of the application has probably migrated "
            "it. Deploy the newer code, or set on_ahead = warn to start anyway."
        )
