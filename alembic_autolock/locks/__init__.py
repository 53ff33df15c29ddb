"""The migration lock: one small protocol, one module per backend, one factory.

The runner and the env.py hook only ever use :class:`MigrationLock` (the process-local lock,
then the backend's distributed lock, then the fence on the migration session) and
:func:`make_backend` / :func:`make_fence`.

Three properties hold for every backend:

* **Waiting costs no database session.** A waiter makes one *attempt* (one short statement on a
  connection it gives back at once: take the lock, or else become the designated waiter, or
  else read the version table) and sleeps between attempts. Only one process per lock, the
  *designated waiter*, keeps a session (or a Redis key) while it waits, so that a released lock
  or a dead holder is noticed at once; every other waiter notices that the database reached
  its target at its next attempt, at most ``SLOW_POLL`` seconds later.
* **A fence, not only a lock.** The holder's migration session takes a second lock (the fence)
  for the whole run, and the next holder must take it before any revision code runs. So a new
  holder never starts while an earlier holder's migration session is alive, whatever that
  session is doing, and the session it waits for (then ends) is exactly identified.
* **No blind re-runs.** See ``_journal.py``.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from .. import _events as events
from .. import _state
from .._results import Holder as Holder  # re-exported: the backends import it from here
from .._wait import Backoff as Backoff  # re-exported: the backends import it from here
from .._wait import acquire, pause, task_id
from ..exceptions import AutolockError, ConfigError, LockLost, LockTimeout

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from .._settings import Settings

# A waiter that is not the designated one tries again after this many seconds at most (and at
# least half of it): the bound on how late it notices that another process finished.
SLOW_POLL = 1.0
# The designated waiter polls from 5 ms up to this,
FAST_POLL = 0.2
# and reads the version table this often.
LOOK_EVERY = 0.5
# A holder asks whether its lock is still held before each revision, at most this often.
CHECK_EVERY = 0.1


@dataclass(frozen=True)
class Watch:
    """What a waiter looks at between attempts, so that it can stop waiting without the lock.

    ``read(conn)`` returns the database heads, read on ``conn`` (a connection to the migrated
    database that the backend already has open) or, given None, on a short connection of its
    own; None when they could not be read. ``settled(heads)`` says whether those heads make the
    run unnecessary (another process migrated meanwhile).
    """

    read: Callable[[Connection | None], tuple[str, ...] | None]
    settled: Callable[[tuple[str, ...]], bool]

    def done(self, heads: tuple[str, ...] | None) -> bool:
        return heads is not None and self.settled(heads)


@dataclass
class Attempt:
    """The outcome of one attempt (or of a designated wait)."""

    got: bool = False
    designated: bool = False
    heads: tuple[str, ...] | None = None
    holders: list[Holder] | None = None


class LockBackend(Protocol):
    """What a lock backend does. Implementations live in this package, one per module."""

    name: str

    def attempt(self, watch: Watch | None, *, first: Connection | None, describe: bool) -> Attempt:
        """One try, without waiting: take the lock, or else become the designated waiter, or
        else read the heads (``watch``) and let go of every session. ``first`` is a connection
        of the application's engine that the backend takes over (it closes it or keeps it as its
        lock session). With ``describe``, also say who holds the lock."""

    def wait_designated(self, deadline: float, watch: Watch | None) -> Attempt:
        """As the designated waiter: poll until the lock is ours, the watch says the run is
        settled, the designation is lost, or ``deadline`` (a ``time.monotonic()``) passes."""

    def release(self) -> None:
        """Release if held and free every resource. Idempotent; never raises for a lost lock."""

    def holders(self) -> list[Holder]:
        """Who holds and who waits for this lock now (an empty list when free)."""

    def lost(self) -> str | None:
        """None while the lock is still ours; otherwise why it is not."""

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        """Clear the lock someone else holds; return who was cleared. ConfigError if refused."""

    def session(self) -> Connection | None:
        """The AUTOCOMMIT database session that holds the lock, when the lock lives in the
        migrated database (the journal and the second look use it); else None."""

    def last_unreachable(self) -> BaseException | None:
        """The connection error of the last attempt, if it failed on one (a waiter outlasts
        those until its deadline)."""

    def unreachable_error(self, exc: BaseException) -> AutolockError:
        """The library error that reports ``exc``."""


class Fence(Protocol):
    """The second lock, held by the migration session itself for the whole run."""

    name: str

    def take(
        self,
        conn: Connection,
        *,
        wait: float,
        role_name: str | None,
        still_held: Callable[[], None] | None = None,
    ) -> None:
        """Take the fence on the migration connection ``conn``.

        If a previous migration session holds it, wait up to ``wait`` seconds for that session
        to end, then end it, but only after ``still_held()`` (which raises LockLost when the
        lock is gone) says this process still holds the lock: a holder that lost its lock
        while it waited would otherwise end its successor's migration session. ``role_name``
        names the session (only on a connection the library opened). A connection that was
        outside a transaction is left outside one (so Alembic still owns its transactions); one
        inside its caller's transaction is left inside it."""

    def release(self, conn: Connection) -> None:
        """Give the fence back (best effort: the session's end frees it too)."""

    def holders(self, conn: Connection) -> list[Holder]:
        """The migration session that holds the fence, if any."""

    def end(self, conn: Connection, holders: list[Holder]) -> None:
        """End the sessions named by ``holders`` (unlock --force)."""


def cannot_unlock(backend: str, holders: list[Holder], why: str) -> ConfigError:
    held = [h for h in holders if not h.waiting]
    who = "; ".join(h.describe() for h in held) if held else "nobody"
    return ConfigError(f"not unlocking the {backend} lock (held by {who}): {why}")


def owner_tag(role: str, key_hint: str) -> str:
    """An identifier for this process, fit for PostgreSQL's 63-character application_name."""
    text = f"autolock:{role}:{key_hint}:{os.getpid()}:{int(time.time())}:{socket.gethostname()}"
    return text[:63]


def parse_owner_tag(text: str | None) -> datetime | None:
    """The time embedded by :func:`owner_tag`, if ``text`` is one."""
    if not text or not text.startswith("autolock:"):
        return None
    parts = text.split(":")
    try:
        return datetime.fromtimestamp(int(parts[4]), UTC)
    except (IndexError, ValueError):
        return None


def slow_pause(deadline: float, first: bool) -> None:
    """The pause of a waiter that is not the designated one: spread over time, so that a fleet
    of waiters makes a steady trickle of short attempts rather than bursts."""
    pause_s = random.uniform(0.3, SLOW_POLL) if first else random.uniform(SLOW_POLL / 2, SLOW_POLL)
    sleep_for = max(0.0, min(pause_s, deadline - time.monotonic()))
    pause(sleep_for)


class ProcessOnlyLock:
    """For an in-memory SQLite database: only this process can see it, so the process lock is
    the whole lock."""

    name = "process"

    def attempt(self, watch: Watch | None, *, first: Connection | None, describe: bool) -> Attempt:
        if first is not None:
            first.close()
        return Attempt(got=True)

    def wait_designated(self, deadline: float, watch: Watch | None) -> Attempt:
        return Attempt(got=True)

    def release(self) -> None:
        return None

    def holders(self) -> list[Holder]:
        return []

    def lost(self) -> str | None:
        return None

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        raise cannot_unlock(self.name, [], "an in-process lock ends with its process")

    def session(self) -> Connection | None:
        return None

    def last_unreachable(self) -> BaseException | None:
        return None

    def unreachable_error(self, exc: BaseException) -> AutolockError:
        return AutolockError(str(exc))


class NoLock(ProcessOnlyLock):
    """``lock = none``: no distributed lock at all (a warning event says so)."""

    name = "none"

    def attempt(self, watch: Watch | None, *, first: Connection | None, describe: bool) -> Attempt:
        events.emit(
            events.LOCK_DISABLED,
            "warning",
            detail="lock = none: concurrent migrators are not excluded",
        )
        return super().attempt(watch, first=first, describe=describe)

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        raise cannot_unlock(self.name, [], "lock = none has no lock to clear")


def make_backend(settings: Settings, engine: Engine, namespace: str) -> LockBackend:
    """The backend that ``settings.lock`` asks for (``auto``: by the engine's dialect)."""
    choice = settings.lock
    dialect = engine.dialect.name
    if choice == "auto":
        if dialect == "postgresql":
            choice = "postgresql"
        elif dialect in ("mysql", "mariadb"):
            choice = "mysql"
        elif dialect == "sqlite":
            choice = "file"
        else:
            raise ConfigError(
                f"no lock backend for the {dialect!r} dialect: set lock to a redis:// URL, "
                "or to none to run without a lock",
                key="lock",
                value=settings.lock,
                source=settings.source("lock"),
            )
    if choice == "none":
        return NoLock()
    if choice == "postgresql":
        from .postgresql import PostgresLock

        _require_dialect(settings, dialect, ("postgresql",))
        return PostgresLock(engine, namespace, lock_url=settings.lock_url)
    if choice == "mysql":
        from .mysql import MySQLLock

        _require_dialect(settings, dialect, ("mysql", "mariadb"))
        return MySQLLock(engine, namespace, lock_url=settings.lock_url)
    if choice == "file":
        from .file import FileLock, sqlite_path

        _require_dialect(settings, dialect, ("sqlite",))
        path = sqlite_path(engine.url)
        if path is None:
            return ProcessOnlyLock()
        return FileLock(path + "-autolock")
    from .redis import RedisLock

    return RedisLock(choice, namespace, ttl=settings.lock_ttl)


def make_fence(backend: LockBackend, engine: Engine, namespace: str) -> Fence | None:
    """The fence for migration sessions of ``engine``'s database, or None where the lock itself
    is the fence (a file lock, the process lock) or there is no lock (``none``)."""
    if isinstance(backend, ProcessOnlyLock) or backend.name == "file":
        return None
    dialect = engine.dialect.name
    if dialect == "postgresql":
        from .postgresql import PostgresFence

        return PostgresFence(namespace)
    if dialect in ("mysql", "mariadb"):
        from .mysql import MySQLFence

        return MySQLFence(namespace)
    if dialect == "sqlite":
        from .file import FileFence, sqlite_path

        path = sqlite_path(engine.url)
        return None if path is None else FileFence(path + "-autolock")
    return None  # another dialect under a Redis lock: the lock alone, as documented


def _require_dialect(settings: Settings, dialect: str, allowed: tuple[str, ...]) -> None:
    if dialect not in allowed and settings.lock_url is None:
        raise ConfigError(
            f"lock = {settings.lock} needs a {' or '.join(allowed)} database, but the engine is "
            f"{dialect!r}: use lock = auto, a redis:// URL, or set lock_url",
            key="lock",
            value=settings.lock,
            source=settings.source("lock"),
        )


@dataclass(frozen=True)
class Acquired:
    """What :meth:`MigrationLock.acquire` came back with: the lock (``held``), or, while
    waiting, the news that the run is no longer needed (``heads`` as read then)."""

    held: bool
    waited_s: float
    heads: tuple[str, ...] | None = None


class MigrationLock:
    """Process-local lock, then the backend's lock; released in reverse order.

    ``waited_s`` is the time spent waiting for both. ``check()`` raises LockLost when the backend
    reports the lock gone.
    """

    def __init__(
        self, backend: LockBackend, namespace: str, timeout: float, fence: Fence | None = None
    ) -> None:
        self.backend = backend
        # With lock = none other processes may be migrating right now: there is nobody to
        # exclude, no fence and no journal.
        self.excludes_others = not isinstance(backend, NoLock)
        self.namespace = namespace
        self.timeout = timeout
        self.fence = fence
        self.waited_s = 0.0
        self._process_lock: threading.Lock | None = None
        self._checked_at = -CHECK_EVERY

    def acquire(self, watch: Watch | None = None, *, first: Connection | None = None) -> Acquired:
        """Wait up to ``timeout`` for the lock, or until ``watch`` says the run is settled.

        ``first`` (a connection of the application's engine, already used for the first look)
        is handed to the backend, which closes it or keeps it. Raises LockTimeout."""
        start = time.monotonic()
        deadline = start + self.timeout
        try:
            if not self._take_process_lock(start, wait=False):
                # another thread (or task) of this process migrates: give the first look's
                # connection back rather than hold it while waiting
                if first is not None:
                    first.close()
                    first = None
                self._take_process_lock(start, wait=True)
        except BaseException:
            if first is not None:
                first.close()
            raise
        # Whatever interrupts taking the lock (SystemExit from a SIGTERM handler, a
        # KeyboardInterrupt, a listener of lock.acquired) releases what was taken: the
        # process-local lock, the lock and the designation.
        try:
            attempt = self._wait(watch, first, deadline)
            if not attempt.got and not (watch is not None and watch.done(attempt.heads)):
                self._timeout(start)
            self.waited_s = time.monotonic() - start
            if not attempt.got:
                self._release_process_lock()
                return Acquired(False, self.waited_s, attempt.heads)
            events.emit(
                events.LOCK_ACQUIRED,
                backend=self.backend.name,
                namespace=self.namespace,
                waited_s=round(self.waited_s, 4),
            )
        except BaseException:
            self.backend.release()
            self._release_process_lock()
            raise
        return Acquired(True, self.waited_s)

    def _take_process_lock(self, start: float, *, wait: bool) -> bool:
        """Take the process-local lock: without waiting (False if busy), or waiting up to the
        timeout (LockTimeout)."""
        plock = _state.process_lock(self.namespace)
        me = (task_id(), threading.current_thread().name)
        if _state.process_lock_owners.get(self.namespace, (None,))[0] == me[0]:
            raise AutolockError(
                f"thread {me[1]!r} already holds the migration lock {self.namespace!r}: a "
                "migration must not call ensure_migrated/upgrade for its own database"
            )
        if not wait:
            if not plock.acquire(False):
                return False
        elif not acquire(plock, max(0.0, self.timeout - (time.monotonic() - start))):
            owner = _state.process_lock_owners.get(self.namespace, (None, "another thread"))[1]
            holder = Holder(backend="process", session=f"thread {owner!r} of this process")
            waited = time.monotonic() - start
            events.emit(
                events.LOCK_TIMEOUT,
                "error",
                backend="process",
                namespace=self.namespace,
                waited_s=round(waited, 3),
            )
            raise LockTimeout(
                backend="process",
                namespace=self.namespace,
                waited_s=waited,
                timeout_s=self.timeout,
                holders=[holder],
            )
        _state.process_lock_owners[self.namespace] = me
        self._process_lock = plock
        return True

    def _wait(self, watch: Watch | None, first: Connection | None, deadline: float) -> Attempt:
        backend = self.backend
        attempt = backend.attempt(watch, first=first, describe=True)
        announced = False
        retries = 0
        while True:
            if attempt.got or (watch is not None and watch.done(attempt.heads)):
                return attempt
            if not announced:  # before the designated waiter's wait too: it may be long
                announced = True
                events.emit(
                    events.LOCK_WAITING,
                    backend=backend.name,
                    namespace=self.namespace,
                    holders=[h.describe() for h in attempt.holders or () if not h.waiting],
                )
            if attempt.designated:
                attempt = backend.wait_designated(deadline, watch)
                if attempt.got or (watch is not None and watch.done(attempt.heads)):
                    return attempt
            if time.monotonic() >= deadline:
                return attempt
            slow_pause(deadline, first=retries == 0)
            retries += 1
            attempt = backend.attempt(watch, first=None, describe=False)

    def _timeout(self, start: float) -> None:
        unreachable = self.backend.last_unreachable()
        if unreachable is not None:  # the whole wait ended on a connection error
            raise self.backend.unreachable_error(unreachable) from unreachable
        waited = time.monotonic() - start
        holders = _safe_holders(self.backend)
        events.emit(
            events.LOCK_TIMEOUT,
            "error",
            backend=self.backend.name,
            namespace=self.namespace,
            waited_s=round(waited, 3),
            holders=[h.describe() for h in holders],
        )
        raise LockTimeout(
            backend=self.backend.name,
            namespace=self.namespace,
            waited_s=waited,
            timeout_s=self.timeout,
            holders=holders,
        )

    def _release_process_lock(self) -> None:
        if self._process_lock is not None:
            _state.process_lock_owners.pop(self.namespace, None)
            self._process_lock.release()
            self._process_lock = None

    @property
    def held(self) -> bool:
        return self._process_lock is not None

    def release(self) -> None:
        if self._process_lock is None:
            return
        try:
            self.backend.release()
        except Exception as exc:  # release never masks the run's own outcome
            events.emit(
                events.LOCK_RELEASE_FAILED,
                "warning",
                backend=self.backend.name,
                namespace=self.namespace,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            self._release_process_lock()
        events.emit(events.LOCK_RELEASED, backend=self.backend.name, namespace=self.namespace)

    def check(self, *, revision: str | None, applied: list[str]) -> None:
        """Raise LockLost if the lock is gone. Called before each revision; asked of the
        backend at most every ``CHECK_EVERY`` seconds (a short revision after another does not
        pay a round trip: the fence, not this check, keeps a second migrator out)."""
        now = time.monotonic()
        if now - self._checked_at < CHECK_EVERY:
            return
        reason = self.lost()
        if reason is not None:
            raise self.lost_error(reason, revision=revision, applied=applied)
        self._checked_at = time.monotonic()

    def lost(self) -> str | None:
        return self.backend.lost()

    def require_held(self) -> None:
        """Raise LockLost if the lock is gone (asking the backend now, whatever ``check``'s
        pace)."""
        reason = self.lost()
        if reason is not None:
            raise self.lost_error(reason, revision=None, applied=[])
        self._checked_at = time.monotonic()

    def lost_error(
        self,
        reason: str,
        *,
        revision: str | None,
        applied: list[str],
        state: str | None = None,
        during: bool = False,
    ) -> LockLost:
        events.emit(
            events.LOCK_LOST,
            "error",
            backend=self.backend.name,
            namespace=self.namespace,
            reason=reason,
            revision=revision,
            during=during,
        )
        return LockLost(
            backend=self.backend.name,
            namespace=self.namespace,
            reason=reason,
            revision=revision,
            applied=applied,
            state=state,
            during=during,
        )

    @contextmanager
    def fenced(self, conn: Connection, *, wait: float, owned: bool) -> Iterator[Connection]:
        """Hold the fence on the migration connection ``conn`` for the duration."""
        if self.fence is None or not self.excludes_others:
            yield conn
            return
        name = owner_tag("migrate", _hint(self.namespace)) if owned else None
        self.fence.take(conn, wait=wait, role_name=name, still_held=self.require_held)
        try:
            # the lock may have gone while the fence was awaited: then the fence may be the
            # successor's to take, and nothing of this run may start
            self.require_held()
            yield conn
        finally:
            self.fence.release(conn)

    def holders(self) -> list[Holder]:
        return self.backend.holders()


def _hint(namespace: str) -> str:
    from .postgresql import advisory_key

    return f"{advisory_key(namespace) & 0xFFFFFFFF:08x}"


def _safe_holders(backend: LockBackend) -> list[Holder]:
    try:
        return backend.holders()
    except Exception:  # naming the holder is best effort; the timeout itself is the news
        return []
