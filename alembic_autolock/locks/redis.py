"""Redis: python-redis-lock 4.0.x, with each of its known pitfalls handled around it.

Keys (one namespace = one lock)::

    lock:alembic_autolock:{<hash>}          the lock; value = owner id; expires after lock_ttl
    lock-signal:alembic_autolock:{<hash>}   python-redis-lock's wake-up list

``<hash>`` is 16 hex digits of a hash of the namespace; the braces make it a Redis Cluster hash
tag, so both keys live in one slot. The ``lock:``/``lock-signal:`` prefixes are imposed by
python-redis-lock. The owner id is ``<host>:<pid>:<program>:<random>``.

Pitfalls and what is done about them:

* redis-py 8's default 5 s socket timeout breaks BLPOP waits longer than 5 s, and
  python-redis-lock int()-truncates timeouts (``timeout=0.5`` waits forever). This backend never
  blocks in Redis: it polls ``acquire(blocking=False)`` with jittered backoff up to the
  caller's deadline, so any timeout, sub-second ones included, is exact, and the client's
  socket timeout only bounds one round trip. Its "Failed to acquire" warning is filtered out
  for our own keys only.
* Expiry while held: the lock is created with ``expire=lock_ttl`` and renewed by a daemon
  thread every ``lock_ttl / 3`` s (the library's default, 2/3, survives no missed renewal).
* The renewal thread dies silently on an error: our renewer records the error instead, and
  ``lost()`` (checked before every revision) reports it, as it reports a key that no longer
  holds our owner id. Redis unreachable at that point also counts as lost: fail closed.
* ``reset_all()`` deletes every application's locks: never called; ``unlock`` deletes only
  this namespace's key.
* ``strict=`` is not passed (python-redis-lock 4.1 removes it).
* Its Lua scripts are registered on ``redis_lock.Lock`` itself, never first on our subclass
  (its once-only global registration would leave the base class without them).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import sys
import threading
import time
import weakref
from typing import Any

from .._mask import mask_text, mask_url
from ..exceptions import LockUnavailable
from . import LOOK_EVERY, Attempt, Backoff, Holder, Watch, cannot_unlock

try:
    import redis
    import redis_lock
except ImportError as exc:  # pragma: no cover - depends on the extras installed
    raise ImportError(
        "the redis lock backend needs the redis extra: pip install 'alembic-autolock[redis]'"
    ) from exc


def key_name(namespace: str) -> str:
    """The python-redis-lock name for ``namespace`` (the Redis key is ``lock:`` + this)."""
    digest = hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()
    return f"alembic_autolock:{{{digest}}}"


class _QuietOwnFailures(logging.Filter):
    """Drop python-redis-lock's per-attempt "Failed to acquire" warning for our keys only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            record.msg.startswith("Failed to acquire")
            and args
            and str(args[0]).startswith("lock:alembic_autolock:")
        )


_quiet_installed = False


def _install_quiet_filter() -> None:
    global _quiet_installed
    if not _quiet_installed:
        logging.getLogger("redis_lock.acquire").addFilter(_QuietOwnFailures())
        _quiet_installed = True


class _RenewingLock(redis_lock.Lock):  # type: ignore[misc]
    """python-redis-lock's Lock whose renewal thread records its failure instead of dying
    silently."""

    renewal_error: BaseException | None = None

    @staticmethod
    def _lock_renewer(
        name: str,
        lockref: weakref.ReferenceType[_RenewingLock],
        interval: float,
        stop: threading.Event,
    ) -> None:
        while not stop.wait(timeout=interval):
            lock = lockref()
            if lock is None:
                break
            try:
                lock.extend(expire=lock._expire)
            except Exception as exc:  # recorded, and reported by lost() before the next step
                lock.renewal_error = exc
                break
            finally:
                del lock


def owner_id() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{socket.gethostname()}:{os.getpid()}:{program}:{os.urandom(4).hex()}"


def client_for(url: str) -> Any:
    """The process's client for ``url`` (its connection pool is reused across locks); its socket
    timeout bounds one round trip, since we never block in Redis."""
    from .. import _state

    with _state.registry_lock:
        client = _state.redis_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
            _state.redis_clients[url] = client
        return client


class RedisLock:
    """The lock is a python-redis-lock key; the designation a plain key of ours with a short
    expiry (``lock:`` prefix aside, both under one hash tag); the fence lives in the database
    (see ``make_fence``)."""

    name = "redis"

    def __init__(self, url: str, namespace: str, *, ttl: float) -> None:
        self.url = url
        self.namespace = namespace
        self.key = key_name(namespace)
        self.wait_key = self.key + ":waiter"
        self.ttl = max(2, math.ceil(ttl))
        self._client = client_for(url)
        self._lock: _RenewingLock | None = None
        self._waiter_id: str | None = None
        self._unreachable: BaseException | None = None
        self._maybe_held = False

    def _new_lock(self) -> _RenewingLock:
        _install_quiet_filter()
        # python-redis-lock registers its Lua scripts once, on the class it is first called on,
        # behind a module-global flag. Done first from our subclass, the base class would
        # never get them and the application's own redis_lock.Lock would break.
        redis_lock.Lock.register_scripts(self._client)
        lock = _RenewingLock(
            self._client, self.key, expire=self.ttl, id=owner_id(), auto_renewal=True
        )
        lock._lock_renewal_interval = self.ttl / 3
        return lock

    def _try(self) -> bool:
        if self._lock is None:
            self._lock = self._new_lock()
        # Until acquire() returns, the key may be ours without a renewer yet (SystemExit from a
        # SIGTERM handler between its SET and the renewer's start): release() deletes it then.
        self._maybe_held = True
        got = bool(self._lock.acquire(blocking=False))
        self._maybe_held = got
        return got

    def attempt(self, watch: Watch | None, *, first: Any, describe: bool) -> Attempt:
        if first is not None:
            first.close()
        try:
            if self._try():
                return Attempt(got=True)
            waiter = owner_id()
            if self._client.set(self.wait_key, waiter, nx=True, px=_WAITER_TTL_MS):
                self._waiter_id = waiter
                return Attempt(designated=True, holders=self.holders() if describe else None)
            holders = self.holders() if describe else None
        except redis.RedisError as exc:
            self._unreachable = exc
            raise self.unavailable(exc) from exc
        heads = watch.read(None) if watch is not None else None
        return Attempt(heads=heads, holders=holders)

    def wait_designated(self, deadline: float, watch: Watch | None) -> Attempt:
        backoff = Backoff(max(0.0, deadline - time.monotonic()))
        next_look = time.monotonic() + LOOK_EVERY
        try:
            while True:
                if self._try():
                    self._end_designation()
                    return Attempt(got=True)
                if not self._client.eval(
                    _REFRESH_WAITER, 1, self.wait_key, self._waiter_id, _WAITER_TTL_MS
                ):
                    self._waiter_id = None  # expired (we were frozen): wait as anybody else
                    return Attempt()
                now = time.monotonic()
                if watch is not None and now >= next_look:
                    next_look = now + LOOK_EVERY
                    heads = watch.read(None)
                    if watch.done(heads):
                        self._end_designation()
                        return Attempt(heads=heads)
                if not backoff.sleep():
                    self._end_designation()
                    return Attempt()
        except redis.RedisError as exc:
            raise self.unavailable(exc) from exc

    def _end_designation(self) -> None:
        waiter, self._waiter_id = self._waiter_id, None
        if waiter is not None:
            with contextlib.suppress(redis.RedisError):
                self._client.eval(_DROP_WAITER, 1, self.wait_key, waiter)

    def unavailable(self, exc: BaseException) -> LockUnavailable:
        masked = mask_url(self.url)
        detail = mask_text(f"{type(exc).__name__}: {exc}", self.url)
        return LockUnavailable(
            f"cannot reach the Redis lock server at {masked} ({detail}); nothing was applied "
            "without the lock. Check that Redis is running and that the lock URL is right.",
            backend="redis",
            url=masked,
        )

    def unreachable_error(self, exc: BaseException) -> LockUnavailable:
        return self.unavailable(exc)

    def last_unreachable(self) -> BaseException | None:
        return self._unreachable

    def release(self) -> None:
        self._end_designation()
        lock, self._lock = self._lock, None
        maybe, self._maybe_held = self._maybe_held, False
        try:
            if lock is not None and (lock._lock_renewal_thread is not None or maybe):
                lock.release()  # stops the renewer, then deletes the key if it is still ours
        except (redis_lock.NotAcquired, redis.RedisError):
            pass  # expired, taken or unreachable: lost() has already said so before each step

    def session(self) -> None:
        return None

    def lost(self) -> str | None:
        lock = self._lock
        if lock is None or lock._lock_renewal_thread is None:
            return "the lock was never acquired or already released"
        if lock.renewal_error is not None:
            err = lock.renewal_error
            return (
                f"renewing the lock failed ({type(err).__name__}: {mask_text(str(err), self.url)})"
            )
        try:
            current = lock.get_owner_id()
        except redis.RedisError as exc:
            return f"Redis is unreachable ({type(exc).__name__}: {mask_text(str(exc), self.url)})"
        if current != lock.id:
            who = f"now held by {current}" if current else "it expired"
            return f"the lock key no longer holds our owner id ({who})"
        return None

    def holders(self) -> list[Holder]:
        name = "lock:" + self.key
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            pipe.get(self.wait_key)
            owner, ttl_ms, waiter = pipe.execute()
        except redis.RedisError as exc:
            raise self.unavailable(exc) from exc
        found = []
        if owner is not None:
            found.append(
                Holder(
                    backend="redis",
                    owner=_text(owner),
                    ttl_s=ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else None,
                )
            )
        if waiter is not None:
            found.append(Holder(backend="redis", owner=_text(waiter), waiting=True, role="wait"))
        return found

    def unlock(self, *, owner: str | None, force: bool) -> list[Holder]:
        held = [h for h in self.holders() if not h.waiting]
        if not held:
            return []
        current = held[0].owner
        redis_lock.Lock.register_scripts(self._client)
        if force:
            redis_lock.Lock(self._client, self.key).reset()  # this namespace's key only
            return held
        if owner is None:
            raise cannot_unlock(
                self.name,
                held,
                f"pass --owner {current} to delete it if that owner is gone (the key is "
                "deleted only while it still holds that owner), or --force",
            )
        try:  # compare-and-delete, atomically, by python-redis-lock's release script
            redis_lock.Lock(self._client, self.key, id=owner).release()
        except redis_lock.NotAcquired:
            raise cannot_unlock(
                self.name, held, f"it is held by {current}, not by {owner}; nothing deleted"
            ) from None
        return held


_WAITER_TTL_MS = 3000
# Extend the designation only while it is still ours; drop it only if it is ours.
_REFRESH_WAITER = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
_DROP_WAITER = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
    "else return 0 end"
)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
