"""Waiting that never blocks an event loop.

The runner is synchronous. For an AsyncEngine it runs inside SQLAlchemy's ``greenlet_spawn``
(as ``AsyncConnection.run_sync`` does): every database call then awaits the async driver, and
the loop runs other tasks meanwhile. Only the library's own pauses could still block the loop's
thread; they go through :func:`pause`, which inside such a greenlet awaits ``asyncio.sleep``
and elsewhere sleeps. Locks of this process are taken the same way (:func:`acquire`): two
tasks of one loop share a thread, so a blocking ``threading.Lock.acquire`` would deadlock them.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


def in_greenlet() -> bool:
    """Whether this code runs inside SQLAlchemy's greenlet_spawn (an AsyncEngine's sync
    facade). Without greenlet installed, it cannot."""
    if "greenlet" not in sys.modules:
        return False
    from sqlalchemy.util.concurrency import in_greenlet as sqlalchemy_in_greenlet

    return bool(sqlalchemy_in_greenlet())


def pause(seconds: float) -> None:
    """Sleep ``seconds``; inside an event loop's greenlet, let the loop run meanwhile."""
    if seconds <= 0:
        return
    if in_greenlet():
        from sqlalchemy.util.concurrency import await_

        await_(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def offload(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)``; inside an event loop's greenlet, in a worker thread, so that
    file system work (reading the configuration, loading the scripts) does not stall it."""
    if in_greenlet():
        from sqlalchemy.util.concurrency import await_

        return await_(asyncio.to_thread(fn, *args, **kwargs))
    return fn(*args, **kwargs)


def acquire(lock: threading.Lock, timeout: float | None) -> bool:
    """``lock.acquire`` with a timeout in seconds (None: for ever); inside an event loop's
    greenlet it polls, pausing cooperatively, since the holder may be another task of the same
    thread."""
    if not in_greenlet():
        if timeout is None:
            return lock.acquire()
        return (
            lock.acquire(timeout=min(timeout, threading.TIMEOUT_MAX))
            if timeout
            else (lock.acquire(False))
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while not lock.acquire(False):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        remaining = 0.05 if deadline is None else deadline - time.monotonic()
        pause(min(delay, max(0.0, remaining)))
        delay = min(delay * 2, 0.05)
    return True


class Backoff:
    """Jittered exponential sleeps between lock attempts, never past the deadline."""

    def __init__(self, timeout: float, first: float = 0.005, cap: float = 0.2) -> None:
        self.deadline = time.monotonic() + timeout
        self.delay = first
        self.cap = cap

    def sleep(self) -> bool:
        """Sleep before the next attempt; False when the deadline has passed."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        pause(min(remaining, self.delay * random.uniform(0.5, 1.5)))
        self.delay = min(self.delay * 2, self.cap)
        return True


def task_id() -> tuple[int, int]:
    """Who is running: the thread, and inside an event loop's greenlet the greenlet too (two
    tasks of one loop share a thread)."""
    if in_greenlet():
        import greenlet

        return threading.get_ident(), id(greenlet.getcurrent())
    return threading.get_ident(), 0


def run_for_engine(engine: Any, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)``; for an async driver (an asyncpg URL in alembic.ini, an AsyncEngine),
    inside an event loop's greenlet, as SQLAlchemy's asyncio extension runs synchronous code."""
    if not engine.dialect.is_async or in_greenlet():
        return fn(*args)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        from sqlalchemy.util.concurrency import greenlet_spawn

        return asyncio.run(greenlet_spawn(fn, *args))
    from .exceptions import ConfigError

    raise ConfigError(
        f"the database URL uses an async driver ({engine.dialect.driver}) and an event loop is "
        "already running in this thread: run Alembic's command inside "
        "`await connection.run_sync(...)`, or use alembic_autolock.ensure_migrated_async()"
    )
