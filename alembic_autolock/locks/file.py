"""SQLite: an exclusive ``flock`` on a file beside the database (``<database>-autolock``).

The kernel drops the lock when the holding process exits, however it exits, so a dead holder
never blocks anyone. While held, the file names the holder (host, pid, since) for a waiter's
timeout message; only the holder writes it. The path is built from the database file's real
path, so two processes that reach one database through a symlink lock the same file. POSIX
only (fcntl).

Polling a local lock costs no database session, so every waiter polls it quickly (it is always
"designated"); the lock is its own fence (the migration connection lives in the holding
process). Under a Redis lock, :class:`FileFence` takes the same file as the fence.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.engine import URL, Connection

from ..exceptions import AutolockError, LockTimeout
from . import LOOK_EVERY, Attempt, Backoff, Holder, Watch, cannot_unlock


def sqlite_path(url: URL) -> str | None:
    """The real absolute path of an SQLite database file, or None for an in-memory database."""
    database = url.database or ""
    uri = str(url.query.get("uri", "")).lower() in ("true", "1")
    if uri:
        if "mode=memory" in database:
            return None
        database = database.removeprefix("file:").split("?", 1)[0]
    if database in ("", ":memory:"):
        return None
    return os.path.realpath(database)


class _Flock:
    """One exclusive flock on ``path``, naming its holder inside the file while held."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._held = False

    def try_lock(self) -> bool:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._held = True
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(me).encode(), 0)
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        held, self._held = self._held, False
        if fd is None:
            return
        try:
            if held:  # only the holder clears the name it wrote
                os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def lost(self) -> str | None:
        if self._fd is None or not self._held:
            return "the lock was never acquired or already released"
        try:
            same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            return f"the lock file {self.path} was removed or replaced while held"
        return None

    def holders(self) -> list[Holder]:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # somebody holds it: say who
            else:
                return []  # nobody holds it
            raw = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        try:
            info = json.loads(raw)
            since = datetime.fromisoformat(info["since"])
            session = f"pid {int(info['pid'])} on {info['host']}"
        except (ValueError, KeyError, TypeError):
            return [Holder(backend="file", session=f"a process holding {self.path}")]
        return [
            Holder(
                backend="file",
                session=session,
                owner=self.path,
                owner_kind="lock file",
                since=since,
            )
        ]


class FileLock:
    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._flock = _Flock(path)

    def attempt(self, watch: Watch | None, *, first: Connection | None, describe: bool) -> Attempt:
        if first is not None:
            first.close()
        if self._flock.try_lock():
            return Attempt(got=True)
        return Attempt(designated=True, holders=self.holders() if describe else None)

    def wait_designated(self, deadline: float, watch: Watch | None) -> Attempt:
        backoff = Backoff(max(0.0, deadline - time.monotonic()))
        next_look = time.monotonic() + LOOK_EVERY
        while True:
            if self._flock.try_lock():
                return Attempt(got=True)
            now = time.monotonic()
            if watch is not None and now >= next_look:
                next_look = now + LOOK_EVERY
                heads = watch.read(None)
                if watch.done(heads):
                    return Attempt(heads=heads)
            if not backoff.sleep():
                return Attempt()

    def release(self) -> None:
        self._flock.release()

    def lost(self) -> str | None:
        return self._flock.lost()

    def holders(self) -> list[Holder]:
        return self._flock.holders()

    def session(self) -> None:
        return None

    def last_unreachable(self) -> None:
        return None

    def unreachable_error(self, exc: BaseException) -> AutolockError:
        return AutolockError(str(exc))

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        raise cannot_unlock(
            self.name,
            self.holders(),
            "a file lock is released by the kernel when the holding process exits; stop that "
            "process (it is named above) instead",
        )


class FileFence:
    """Under a Redis lock, an SQLite database's fence is the same file lock: a process that
    lost its Redis lock but is still alive (frozen, say) keeps the file, and nobody can end it
    from here, so the next holder waits and then says who it is."""

    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._flock = _Flock(path)

    def take(
        self,
        conn: Connection,
        *,
        wait: float,
        role_name: str | None,
        still_held: Callable[[], None] | None = None,
    ) -> None:
        backoff = Backoff(wait, first=0.01, cap=0.1)
        while not self._flock.try_lock():
            if not backoff.sleep():
                raise LockTimeout(
                    backend="fence",
                    namespace=self.path,
                    waited_s=wait,
                    timeout_s=wait,
                    holders=self._flock.holders(),
                    hint="Another process still migrates this SQLite database: stop it, then "
                    "retry.",
                )

    def release(self, conn: Connection) -> None:
        self._flock.release()

    def holders(self, conn: Connection) -> list[Holder]:
        return self._flock.holders()

    def end(self, conn: Connection, holders: list[Holder]) -> None:
        return None
