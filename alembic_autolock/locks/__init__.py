"""The migration lock: one small protocol, one module per backend, one factory.

The runner and the env.py hook only ever use :class:`MigrationLock` (a context manager that
takes the process-local lock, then the backend's distributed lock, and reports who holds it on
timeout) and :func:`make_backend`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from .. import _events as events
from .. import _state
from ..exceptions import AutolockError, ConfigError, LockLost, LockTimeout

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .._settings import Settings


@dataclass(frozen=True)
class Holder:
    """Who holds (or waits for) a lock, as far as the backend can tell."""

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
                parts.append(f"{'waiting' if self.waiting else 'holding'} since {stamp}")
        if self.ttl_s is not None:
            parts.append(f"expires in {self.ttl_s:.1f}s unless renewed")
        return ", ".join(parts) or f"an unidentified {self.backend} session"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"] = self.since.isoformat() if self.since else None
        return data


class LockBackend(Protocol):
    """What a lock backend does. Implementations live in this package, one per module."""

    name: str

    def acquire(self, timeout: float) -> bool:
        """Try until ``timeout`` seconds have passed (0: try once). True if now held."""

    def release(self) -> None:
        """Release if held and free every resource. Idempotent; never raises for a lost lock."""

    def holders(self) -> list[Holder]:
        """Who holds and who waits for this lock now (an empty list when free)."""

    def lost(self) -> str | None:
        """None while the lock is still ours; otherwise why it is not."""

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        """Clear the lock someone else holds; return who was cleared. ConfigError if refused."""


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


class Backoff:
    """Jittered exponential sleeps between lock attempts, never past the deadline."""

    def __init__(self, timeout: float, first: float = 0.005, cap: float = 0.2) -> None:
        self.deadline = time.monotonic() + timeout
        self.delay = first
        self.cap = cap

    def sleep(self) -> bool:
        """Sleep before the next attempt; False when the deadline has passed."""
        import random

        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(remaining, self.delay * random.uniform(0.5, 1.5)))
        self.delay = min(self.delay * 2, self.cap)
        return True


class ProcessOnlyLock:
    """For an in-memory SQLite database: only this process can see it, so the process lock is
    the whole lock."""

    name = "process"

    def acquire(self, timeout: float) -> bool:
        return True

    def release(self) -> None:
        return None

    def holders(self) -> list[Holder]:
        return []

    def lost(self) -> str | None:
        return None

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        raise cannot_unlock(self.name, [], "an in-process lock ends with its process")


class NoLock(ProcessOnlyLock):
    """``lock = none``: no distributed lock at all (a warning event says so)."""

    name = "none"

    def acquire(self, timeout: float) -> bool:
        events.emit(
            events.LOCK_DISABLED,
            "warning",
            detail="lock = none: concurrent migrators are not excluded",
        )
        return True

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


def _require_dialect(settings: Settings, dialect: str, allowed: tuple[str, ...]) -> None:
    if dialect not in allowed and settings.lock_url is None:
        raise ConfigError(
            f"lock = {settings.lock} needs a {' or '.join(allowed)} database, but the engine is "
            f"{dialect!r}: use lock = auto, a redis:// URL, or set lock_url",
            key="lock",
            value=settings.lock,
            source=settings.source("lock"),
        )


class MigrationLock:
    """Process-local lock, then the backend's lock; released in reverse order.

    ``waited_s`` is the time spent waiting for both. ``check()`` raises LockLost when the backend
    reports the lock gone.
    """

    def __init__(self, backend: LockBackend, namespace: str, timeout: float) -> None:
        self.backend = backend
        # With lock = none other processes may be migrating right now: their sessions are not
        # orphans and must not be terminated.
        self.excludes_others = not isinstance(backend, NoLock)
        self.namespace = namespace
        self.timeout = timeout
        self.waited_s = 0.0
        self._process_lock: threading.Lock | None = None

    def acquire(self) -> float:
        start = time.monotonic()
        name = self.backend.name
        plock = _state.process_lock(self.namespace)
        me = (threading.get_ident(), threading.current_thread().name)
        if _state.process_lock_owners.get(self.namespace, (None,))[0] == me[0]:
            raise AutolockError(
                f"thread {me[1]!r} already holds the migration lock {self.namespace!r}: a "
                "migration must not call ensure_migrated/upgrade for its own database"
            )
        got = plock.acquire(timeout=self.timeout) if self.timeout else plock.acquire(False)
        if not got:
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
        try:
            got = self.backend.acquire(0)
            if not got:
                holders = _safe_holders(self.backend)
                events.emit(
                    events.LOCK_WAITING,
                    backend=name,
                    namespace=self.namespace,
                    holders=[h.describe() for h in holders if not h.waiting],
                )
                remaining = self.timeout - (time.monotonic() - start)
                got = remaining > 0 and self.backend.acquire(remaining)
            if not got:
                waited = time.monotonic() - start
                holders = _safe_holders(self.backend)
                events.emit(
                    events.LOCK_TIMEOUT,
                    "error",
                    backend=name,
                    namespace=self.namespace,
                    waited_s=round(waited, 3),
                    holders=[h.describe() for h in holders],
                )
                raise LockTimeout(
                    backend=name,
                    namespace=self.namespace,
                    waited_s=waited,
                    timeout_s=self.timeout,
                    holders=holders,
                )
        except BaseException:
            self.backend.release()
            self._release_process_lock()
            raise
        self.waited_s = time.monotonic() - start
        events.emit(
            events.LOCK_ACQUIRED,
            backend=name,
            namespace=self.namespace,
            waited_s=round(self.waited_s, 4),
        )
        return self.waited_s

    def _release_process_lock(self) -> None:
        if self._process_lock is not None:
            _state.process_lock_owners.pop(self.namespace, None)
            self._process_lock.release()
            self._process_lock = None

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
        reason = self.backend.lost()
        if reason is not None:
            events.emit(
                events.LOCK_LOST,
                "error",
                backend=self.backend.name,
                namespace=self.namespace,
                reason=reason,
                stopped_before=revision,
            )
            raise LockLost(
                backend=self.backend.name,
                namespace=self.namespace,
                reason=reason,
                revision=revision,
                applied=applied,
            )

    @contextmanager
    def held(self) -> Iterator[MigrationLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()


def _safe_holders(backend: LockBackend) -> list[Holder]:
    try:
        return backend.holders()
    except Exception:  # naming the holder is best effort; the timeout itself is the news
        return []
