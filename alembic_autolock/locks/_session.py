"""What the PostgreSQL and MySQL backends share: a lock owned by a database session, taken
without holding a session while waiting.

Connections. An attempt runs on one connection to the migrated database, in AUTOCOMMIT:

* the application's first-look connection, when the runner hands it over;
* else one borrowed from the application's pool, if the pool has one idle (no new connection);
* else a new one made exactly as the application's engine makes them (same creator, connect
  arguments, dialect and pool events) but outside its pool;
* with ``lock_url``, always a new one from a NullPool engine for that URL.

A connection that takes the lock (or becomes the designated waiter) is detached from any pool
at once, so it can never return to a pool still holding the lock, and is closed after the
release. Any other attempt connection is given back (or closed) before the waiter sleeps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from .. import _state
from .._db import SERVER_FULL_WAIT, connect_retrying, transient
from ..exceptions import AutolockError
from . import FAST_POLL, LOOK_EVERY, Attempt, Backoff, Holder, Watch

_SET_NAME_SQL = text("SELECT set_config('application_name', :name, false)")


def lock_engine_for(lock_url: str | None) -> Engine | None:
    """A dedicated NullPool engine for ``lock_url`` (one per URL per process), else None."""
    if lock_url is None:
        return None
    with _state.registry_lock:
        lock_engine = _state.lock_engines.get(lock_url)
        if lock_engine is None:
            from .._mask import parse_url

            lock_engine = create_engine(parse_url(lock_url, "lock_url"), poolclass=NullPool)
            _state.lock_engines[lock_url] = lock_engine
        return lock_engine


def side_engine_for(engine: Engine) -> Engine:
    """An engine that makes connections exactly as ``engine`` does (same creator, connect
    arguments and pool events) from a pool of its own, so that taking a lock connection never
    takes a connection out of the application's pool. One per application engine."""
    with _state.registry_lock:
        side = _state.side_engines.get(engine)
        if side is None:
            # The recreated pool carries the engine's pool events (the dialect's per-connection
            # setup among them); sharing the dialect, rather than create_engine(), adds none.
            side = Engine(engine.pool.recreate(), engine.dialect, engine.url)
            _state.side_engines[engine] = side
        return side


def open_side_connection(
    engine: Engine, lock_engine: Engine | None = None, tag: str | None = None
) -> Connection:
    """A connection outside the application's pool, in AUTOCOMMIT; on PostgreSQL named ``tag``
    in pg_stat_activity. DatabaseUnavailable if the server cannot be reached."""
    source = lock_engine or side_engine_for(engine)
    try:
        conn = connect_retrying(source, time.monotonic() + SERVER_FULL_WAIT)
    except DBAPIError as exc:
        from .._db import unavailable

        raise unavailable(lock_engine or engine, exc) from exc
    try:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        if lock_engine is None:
            conn.detach()  # closed, never returned to the pool
        if tag is not None and conn.dialect.name == "postgresql":
            conn.execute(_SET_NAME_SQL, {"name": tag})
    except BaseException:
        close(conn)
        raise
    return conn


def close(conn: Connection) -> None:
    """End ``conn``'s session now. Invalidating a connection that was detached from its pool
    only drops SQLAlchemy's reference to the DBAPI connection (the session lingers until
    garbage collection gets to it), so the DBAPI connection is closed here as well."""
    raw = None
    if not conn.closed and not conn.invalidated:
        with contextlib.suppress(SQLAlchemyError):
            raw = conn.connection.dbapi_connection
    with contextlib.suppress(SQLAlchemyError):
        conn.invalidate()
    with contextlib.suppress(SQLAlchemyError):
        conn.close()
    if raw is not None:
        with contextlib.suppress(Exception):  # already closed, or its socket is gone
            raw.close()


@contextmanager
def side_connection(
    engine: Engine, lock_engine: Engine | None = None, tag: str | None = None
) -> Iterator[Connection]:
    conn = open_side_connection(engine, lock_engine, tag)
    try:
        yield conn
    finally:
        close(conn)


def release_on(conn: Connection, statement: Any, parameters: dict[str, Any]) -> None:
    """Run a release statement on a migration connection, whatever state a failure left it
    in (best effort: when the session is gone, so is what it held). Session locks are released
    at once, whatever becomes of the transaction the statement ran in."""
    if conn.invalidated or conn.closed:
        return
    try:
        conn.execute(statement, parameters)
    except DBAPIError:
        return
    except SQLAlchemyError:  # a failed transaction must be rolled back first
        try:
            conn.rollback()
            conn.execute(statement, parameters)
        except SQLAlchemyError:
            return


def _idle_in_pool(engine: Engine) -> bool:
    checkedin = getattr(engine.pool, "checkedin", None)
    try:
        return bool(checkedin()) if checkedin is not None else False
    except Exception:  # a custom pool without the counter: do not borrow
        return False


class SessionLock:
    """Base of the PostgreSQL and MySQL backends: the attempt, the designated wait, the
    release. Subclasses provide the statements."""

    name: str
    # The designated waiter waits inside the server (GET_LOCK with a timeout) rather than
    # polling from the client.
    blocks_in_server = False

    def __init__(self, engine: Engine, namespace: str, *, lock_url: str | None = None) -> None:
        self.engine = engine
        self.namespace = namespace
        self._lock_engine = lock_engine_for(lock_url)
        self._conn: Connection | None = None
        self._wait_conn: Connection | None = None
        self._held = False
        self._unreachable: BaseException | None = None

    # --- statements (subclasses) ---------------------------------------------------------

    def _try(self, conn: Connection) -> tuple[bool, bool]:
        """Try the lock; failing that, the designation. (got lock, got designation)."""
        raise NotImplementedError

    def _try_lock(self, conn: Connection, wait: float) -> bool:
        """As the designated waiter: try the lock (waiting up to ``wait`` in the server if
        ``blocks_in_server``); on success give the designation back."""
        raise NotImplementedError

    def _drop_designation(self, conn: Connection) -> None:
        raise NotImplementedError

    def _unlock(self, conn: Connection) -> None:
        raise NotImplementedError

    def _on_got(self, conn: Connection) -> None:
        """Checks right after taking the lock (ConfigError to refuse it)."""

    def _holders(self, conn: Connection) -> list[Holder]:
        raise NotImplementedError

    def unreachable_error(self, exc: BaseException) -> AutolockError:
        from .._db import unavailable

        engine = self._lock_engine or self.engine
        if isinstance(exc, DBAPIError):
            return unavailable(engine, exc, while_doing="waiting for the migration lock")
        return AutolockError(f"{type(exc).__name__}: {exc}")

    # --- connections ---------------------------------------------------------------------

    def _checkout(self, first: Connection | None) -> tuple[Connection, bool]:
        """A connection to try on, in AUTOCOMMIT, and whether it was borrowed from the
        application's pool (then it is detached before it is kept, and given back otherwise)."""
        detach = False
        if first is not None and self._lock_engine is None:
            conn, borrowed = first, True
            conn.rollback()  # the first look autobegan a transaction
        else:
            if first is not None:
                first.close()
            if self._lock_engine is not None:
                conn, borrowed = self._lock_engine.connect(), False
            elif _idle_in_pool(self.engine):
                conn, borrowed = self.engine.connect(), True
            else:
                conn, borrowed, detach = side_engine_for(self.engine).connect(), False, True
        try:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            if detach:  # a connection of our own pool: closed, never pooled
                conn.detach()
        except BaseException:
            close(conn)
            raise
        return conn, borrowed

    # --- the protocol --------------------------------------------------------------------

    def attempt(self, watch: Watch | None, *, first: Connection | None, describe: bool) -> Attempt:
        try:
            conn, borrowed = self._checkout(first)
        except DBAPIError as exc:
            return self._failed(exc)
        keep = False
        try:
            got, designated = self._try(conn)
            if got:
                keep = True
                self._conn, self._held = conn, True
                if borrowed:
                    conn.detach()
                self._on_got(conn)
                return Attempt(got=True)
            if designated:
                keep = True
                self._wait_conn = conn
                if borrowed:
                    conn.detach()
                holders = self._holders(conn) if describe else None
                return Attempt(designated=True, holders=holders)
            heads = watch.read(conn) if watch is not None else None
            holders = self._holders(conn) if describe else None
            self._unreachable = None
            return Attempt(heads=heads, holders=holders)
        except DBAPIError as exc:
            keep = False
            if self._conn is conn:
                self._conn, self._held = None, False
            if self._wait_conn is conn:
                self._wait_conn = None
            return self._failed(exc)
        finally:
            if not keep:
                if borrowed:
                    with contextlib.suppress(SQLAlchemyError):
                        conn.close()
                else:
                    close(conn)

    def _failed(self, exc: DBAPIError) -> Attempt:
        if not transient(exc):
            raise self.unreachable_error(exc) from exc
        self._unreachable = exc
        return Attempt()

    def wait_designated(self, deadline: float, watch: Watch | None) -> Attempt:
        conn = self._wait_conn
        if conn is None:
            return Attempt()
        backoff = Backoff(max(0.0, deadline - time.monotonic()), cap=FAST_POLL)
        next_look = time.monotonic() + LOOK_EVERY
        try:
            while True:
                remaining = max(0.0, deadline - time.monotonic())
                if self._try_lock(conn, min(remaining, 0.25)):
                    self._wait_conn = None
                    self._conn, self._held = conn, True
                    self._on_got(conn)
                    return Attempt(got=True)
                now = time.monotonic()
                if watch is not None and now >= next_look:
                    next_look = now + LOOK_EVERY
                    heads = watch.read(conn)
                    if watch.done(heads):
                        self._end_designation()
                        return Attempt(heads=heads)
                if now >= deadline:
                    self._end_designation()
                    return Attempt()
                if not self.blocks_in_server:
                    backoff.sleep()
        except DBAPIError as exc:
            self._wait_conn = None
            close(conn)
            return self._failed(exc)

    def _end_designation(self) -> None:
        conn, self._wait_conn = self._wait_conn, None
        if conn is None:
            return
        with contextlib.suppress(SQLAlchemyError):
            self._drop_designation(conn)
        close(conn)

    def release(self) -> None:
        self._end_designation()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._held:
                self._unlock(conn)
        except SQLAlchemyError:  # DBAPIError, or PendingRollbackError after a failed check
            pass  # the session is gone, and its lock with it
        finally:
            self._held = False
            close(conn)  # a session lock must not outlive this run

    def session(self) -> Connection | None:
        return self._conn if self._held else None

    def holders(self) -> list[Holder]:
        if self._conn is not None:
            return self._holders(self._conn)
        with side_connection(self.engine, self._lock_engine) as conn:
            return self._holders(conn)

    def last_unreachable(self) -> BaseException | None:
        return self._unreachable


class DatabaseFence:
    """Base of the PostgreSQL and MySQL fences: a lock the migration session takes on itself.

    Taking it: try; if a previous migration session holds it, say who (``orphan.waiting``),
    wait up to ``wait`` seconds for that session to end (``orphan.gone``), else end it
    (``orphan.terminated``) and take the fence as soon as the server has let go of it."""

    name: str
    namespace: str
    privilege_hint: str

    def _try(self, conn: Connection, role_name: str | None) -> bool:
        raise NotImplementedError

    def _release_statement(self) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def holders(self, conn: Connection) -> list[Holder]:
        raise NotImplementedError

    def _end_one(self, conn: Connection, holder: Holder) -> None:
        raise NotImplementedError

    def end(self, conn: Connection, holders: list[Holder]) -> None:
        for holder in holders:
            with contextlib.suppress(DBAPIError):  # it may have ended meanwhile
                self._end_one(conn, holder)

    def take(
        self,
        conn: Connection,
        *,
        wait: float,
        role_name: str | None,
        still_held: Callable[[], None] | None = None,
    ) -> None:
        from .. import _events as events
        from ..exceptions import LockTimeout

        outside = not conn.in_transaction()

        def attempt() -> bool:
            got = self._try(conn, role_name)
            if outside:  # leave nothing open for Alembic to take for its caller's transaction
                conn.commit()
            return got

        if attempt():
            return
        found = self.holders(conn)
        described = [h.describe() for h in found] or ["a session that has just ended"]
        events.emit(
            events.ORPHAN_WAITING,
            "warning",
            namespace=self.namespace,
            sessions=described,
            wait_s=wait,
        )
        backoff = Backoff(wait, first=0.02, cap=0.1)
        while backoff.sleep():
            if attempt():
                events.emit(events.ORPHAN_GONE, namespace=self.namespace, sessions=described)
                return
        if still_held is not None:
            still_held()  # LockLost: the session that holds the fence may be the successor's
        for holder in self.holders(conn):
            events.emit(
                events.ORPHAN_TERMINATED,
                "warning",
                namespace=self.namespace,
                session=holder.describe(),
            )
            self.end(conn, [holder])
        if outside:
            conn.commit()
        backoff = Backoff(10, first=0.01, cap=0.1)
        while not attempt():
            if not backoff.sleep():
                raise LockTimeout(
                    backend="fence",
                    namespace=self.namespace,
                    waited_s=wait + 10,
                    timeout_s=wait,
                    holders=self.holders(conn),
                    hint="The migration session of an earlier holder still holds the fence and "
                    f"could not be ended ({self.privilege_hint}): end it by hand, then retry.",
                )

    def release(self, conn: Connection) -> None:
        statement, parameters = self._release_statement()
        release_on(conn, statement, parameters)
