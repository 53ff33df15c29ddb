"""The global state department: every piece of process-wide mutable state lives here.

* ``plans``: prepared runs, keyed by the arguments of ensure_migrated, so that a call at head
  costs a dict lookup and a clock read.
* ``heads``: the "database is at these heads" answers, keyed by database identity, script
  location and version table, each with the monotonic time it stops being trusted.
* ``process_locks``: one lock per namespace, so that two threads of one process never run
  Alembic against the same database at once.
* ``lock_engines``, ``side_engines``, ``redis_clients``: what lock connections are made from
  (per lock_url, per application engine, per Redis URL), built once per process.
* ``engine_tokens``: a number per Engine object, the engine's part of the cache key (an id()
  could be reused by a later engine once the first is gone).
* ``alembic_lock``: held while Alembic runs env.py in this process. Alembic's ``op`` and
  ``context`` are module-level proxies, one per process: two runs at once in two threads (two
  tenant schemas, two databases) would send each other's DDL to the wrong connection.

``reset()`` empties all of it; tests call it before each test. After ``fork()`` the child starts
with empty state (a lock held by a parent thread must not be inherited as held).
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from typing import Any

MAX_PLANS = 256
plans: dict[Any, Any] = {}
# expiry, heads, and what start-up left pending there for a job
heads: dict[Any, tuple[float, tuple[str, ...], tuple[Any, ...]]] = {}
process_locks: dict[str, threading.Lock] = {}
process_lock_owners: dict[str, tuple[tuple[int, int], str]] = {}
lock_engines: dict[str, Any] = {}
side_engines: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
redis_clients: dict[str, Any] = {}
engine_tokens: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_tokens = itertools.count(1)
registry_lock = threading.Lock()
alembic_lock = threading.Lock()
alembic_owner: tuple[int, int] | None = None  # the task holding it (it may enter again)


def reset() -> None:
    """Forget every cached answer and prepared run (process-local locks held stay held)."""
    plans.clear()
    heads.clear()


def _after_fork() -> None:
    """In a forked child (gunicorn --preload, Celery prefork, multiprocessing): nothing of the
    parent's is shared. Every engine the library used gets a fresh pool without closing the
    parent's connections (SQLAlchemy's dispose(close=False)), so the child never talks on a
    socket its parent uses; the library's own engines and clients are dropped the same way."""
    global registry_lock, alembic_lock, alembic_owner
    for engine in [*engine_tokens, *side_engines.values(), *lock_engines.values()]:
        try:
            engine.dispose(close=False)
        except Exception:  # noqa: S112 - an engine in an odd state: the child makes its own
            continue
    plans.clear()
    heads.clear()
    process_locks.clear()
    process_lock_owners.clear()
    lock_engines.clear()
    side_engines.clear()
    redis_clients.clear()  # their sockets belong to the parent
    registry_lock = threading.Lock()
    alembic_lock = threading.Lock()  # a parent's thread may have held it at fork()
    alembic_owner = None


os.register_at_fork(after_in_child=_after_fork)


def process_lock(namespace: str) -> threading.Lock:
    with registry_lock:
        lock = process_locks.get(namespace)
        if lock is None:
            lock = process_locks[namespace] = threading.Lock()
        return lock


def forget_heads(key: Any) -> None:
    heads.pop(key, None)


def engine_token(engine: Any) -> int:
    token = engine_tokens.get(engine)
    if token is None:
        with registry_lock:
            token = engine_tokens.get(engine)
            if token is None:
                token = engine_tokens[engine] = next(_tokens)
    return token
