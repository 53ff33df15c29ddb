"""SQLite: an exclusive ``flock`` on a file beside the database (``<database>-autolock``).

The kernel drops the lock when the holding process exits, however it exits, so a dead holder
never blocks anyone. While held, the file names the holder (host, pid, since) for a waiter's
timeout message. POSIX only (fcntl).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import UTC, datetime

from sqlalchemy.engine import URL

from . import Backoff, Holder, cannot_unlock


def sqlite_path(url: URL) -> str | None:
    """The absolute path of an SQLite database file, or None for an in-memory database."""
    database = url.database or ""
    uri = str(url.query.get("uri", "")).lower() in ("true", "1")
    if uri:
        if "mode=memory" in database:
            return None
        database = database.removeprefix("file:").split("?", 1)[0]
    if database in ("", ":memory:"):
        return None
    return os.path.abspath(database)


class FileLock:
    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        backoff = Backoff(timeout)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not backoff.sleep():
                    return False
                continue
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
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def lost(self) -> str | None:
        if self._fd is None:
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

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        raise cannot_unlock(
            self.name,
            self.holders(),
            "a file lock is released by the kernel when the holding process exits; stop that "
            "process (it is named above) instead",
        )
