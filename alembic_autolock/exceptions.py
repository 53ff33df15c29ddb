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
    "MigrationInterrupted",
    "PendingMigrations",
    "UnversionedDatabase",
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
        hint: str | None = None,
    ) -> None:
        self.backend = backend
        self.namespace = namespace
        self.waited_s = waited_s
        self.timeout_s = timeout_s
        self.holders = tuple(holders)
        what = "the fence of" if backend == "fence" else f"the {backend}"
        super().__init__(
            f"timed out after {waited_s:.1f}s waiting for {what} migration lock "
            f"{namespace!r}: {_describe_holders(self.holders)}. "
            + (
                hint
                or "Another process is probably migrating: wait and retry, raise `timeout`, or "
                "inspect it with `alembic-autolock holders`."
            )
        )


class LockLost(AutolockError):
    """The lock stopped being held while migrations ran. ``revision`` is the revision the run
    stopped before, or (``during``) the one that was cut short.

    ``applied`` lists the revisions of this run that the database shows as applied afterwards
    (with ``transaction = all`` they were rolled back with the rest), ``state`` describes the
    database as read after the run stopped (None if it could not be read)."""

    def __init__(
        self,
        *,
        backend: str,
        namespace: str,
        reason: str,
        revision: str | None,
        applied: Sequence[str] = (),
        state: str | None = None,
        during: bool = False,
    ) -> None:
        self.backend = backend
        self.namespace = namespace
        self.reason = reason
        self.revision = revision
        self.applied = tuple(applied)
        self.state = state
        self.during = during
        if revision is None:
            where = "stopped"
        elif during:
            where = f"revision {revision} was cut short"
        else:
            where = f"stopped before revision {revision}"
        done = ", ".join(self.applied) if self.applied else "none"
        left = f" State left behind: {state}." if state else ""
        super().__init__(
            f"lost the {backend} migration lock {namespace!r} ({reason}); {where}. Revisions "
            f"of this run that stay applied: {done}.{left} Run the upgrade again: it resumes "
            "from the last committed revision."
        )


class MigrationFailed(AutolockError):
    """A migration raised.

    ``revision`` is the revision that failed (None if env.py failed before any revision started),
    ``applied`` the revisions this run applied before it, ``heads`` the database heads read after
    the failure and ``state`` a sentence describing them. The original exception is ``cause``
    (and ``__cause__``).

    ``lock_timeout`` is True when the revision failed only because a statement gave up waiting
    for a table lock (``ddl_lock_timeout``); ``retriable`` when, besides, nothing of it stayed
    applied (it ran in a transaction, or the statement that waited was its first), so running
    it again is safe; ``attempts`` how often it was tried (``ddl_retries``).
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
        lock_timeout: bool = False,
        retriable: bool = False,
        attempts: int = 1,
    ) -> None:
        self.revision = revision
        self.lock_timeout = lock_timeout
        self.retriable = retriable
        self.attempts = attempts
        self._kwargs = {"hint": hint, "upgrade": upgrade, "summary": summary}
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
        if attempts > 1:
            message += f" (it was tried {attempts} times)"
        if hint:
            message += " " + hint
        super().__init__(message)

    def tried(self, attempts: int) -> MigrationFailed:
        """This failure, as the last of ``attempts`` tries."""
        again = MigrationFailed(
            revision=self.revision,
            applied=self.applied,
            cause=self.cause,
            heads=self.heads,
            state=self.state,
            lock_timeout=self.lock_timeout,
            retriable=self.retriable,
            attempts=attempts,
            **self._kwargs,  # type: ignore[arg-type]
        )
        again.__cause__ = self.__cause__
        return again


class MigrationInterrupted(AutolockError):
    """A revision that ran outside a transaction was interrupted (or failed) part-way, so part
    of it may be applied while the version table says it is not: it is not re-run blindly.

    ``revision``, ``direction`` (upgrade or downgrade), ``holder`` (the process that ran it),
    ``started_at`` (UTC) and ``failed`` (it raised, rather than its process dying or losing the
    lock) come from the library's journal; ``command`` is how to resolve it.
    """

    def __init__(
        self,
        *,
        revision: str,
        direction: str,
        holder: str,
        started_at: Any,
        failed: bool,
        detail: str | None,
        command: str,
    ) -> None:
        self.revision = revision
        self.direction = direction
        self.holder = holder
        self.started_at = started_at
        self.failed = failed
        self.detail = detail
        self.command = command
        how = "failed" if failed else "was interrupted"
        stamp = started_at.isoformat(sep=" ", timespec="seconds") if started_at else "?"
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"the {direction} of revision {revision} {how} outside a transaction{why}: started "
            f"by {holder} at {stamp} UTC. Part of its work may be committed while the version "
            "table says it is not, so it is not run again blindly. Look at the database; if "
            f"the revision's changes are in place (or you completed them by hand), run "
            f"`{command} {revision} --applied`; if you undid them, run "
            f"`{command} {revision} --not-applied`; then upgrade again."
        )


class PendingMigrations(AutolockError):
    """Check mode found revisions that are not applied. ``pending`` holds (id, message) pairs."""

    def __init__(
        self,
        *,
        pending: Sequence[tuple[str, str | None]],
        heads: Sequence[str],
        command: str,
        mode_source: str = "default",
    ) -> None:
        self.pending = tuple(pending)
        self.heads = tuple(heads)
        self.command = command
        self.mode_source = mode_source
        listed = ", ".join(f"{rev} ({msg})" if msg else rev for rev, msg in self.pending)
        super().__init__(
            f"{len(self.pending)} migration(s) pending: {listed}. This process is in check mode "
            f"(mode = check, from {mode_source}) and does not migrate; apply them with "
            f"`{command}`, or let this process migrate with ALEMBIC_AUTOLOCK_MODE=upgrade."
        )


class GateClosed(AutolockError):
    """The environment policy refused the action. ``setting`` names what would allow it."""

    def __init__(self, message: str, *, action: str, environment: str, setting: str) -> None:
        super().__init__(message)
        self.action = action
        self.environment = environment
        self.setting = setting


class TimeBudgetExceeded(GateClosed):
    """Start-up refused to begin a run whose revisions are known to take longer than
    ``time_budget``. ``known`` maps each revision with a recorded duration to the longest one
    (seconds); ``total_s`` is their sum; ``command`` runs them outside start-up."""

    def __init__(
        self,
        *,
        revisions: Sequence[str],
        known: dict[str, float],
        budget: float,
        budget_source: str,
        environment: str,
        command: str,
    ) -> None:
        self.revisions = tuple(revisions)
        self.known = dict(known)
        self.total_s = sum(known.values())
        self.budget = budget
        self.command = command
        slowest = sorted(known.items(), key=lambda item: -item[1])[:3]
        listed = ", ".join(f"{rev} {seconds:.1f}s" for rev, seconds in slowest)
        super().__init__(
            f"start-up did not begin migrating: the {len(self.revisions)} pending revision(s) "
            f"are known to take {self.total_s:.1f}s (slowest: {listed}), more than time_budget "
            f"= {budget:g}s (from {budget_source}); nothing was applied. Run them as a job with "
            f"`{command}`, or raise time_budget.",
            action="upgrade",
            environment=environment,
            setting="time_budget",
        )


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


class UnversionedDatabase(AutolockError):
    """``empty_database = create_all`` found tables of the models in a database without a
    version table: it was not built by these migrations, or its version table was dropped, so
    neither creating nor migrating it is safe to guess. ``tables`` names what was found."""

    def __init__(self, *, tables: Sequence[str], version_table: str) -> None:
        self.tables = tuple(tables)
        self.version_table = version_table
        shown = ", ".join(self.tables[:10]) + (" ..." if len(self.tables) > 10 else "")
        super().__init__(
            f"the database has {len(self.tables)} table(s) of the models ({shown}) but no "
            f"{version_table} table, so it is neither empty nor under these migrations: nothing "
            "was created or applied. If its schema is the models' current one, record that with "
            "`alembic stamp head`; otherwise stamp the revision it matches, then upgrade."
        )
