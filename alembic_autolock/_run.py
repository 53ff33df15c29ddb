"""Running Alembic under the lock: the fenced migration session, progress tracking, the
per-revision lock check, the journal, the gate, and failures that say what state the database
was left in.

Alembic calls the command's "migrations function" ``fn(heads, context)`` inside
``MigrationContext.run_migrations`` and iterates over the steps it returns, running each in its
own transaction block. :class:`Tracker` wraps that function in a generator, so it sees the plan
before anything runs (the gate and the connection check happen there, with nothing applied),
checks the lock before each revision starts, journals each revision that will run outside a
transaction, and knows which revision was in progress when something raised. A step counts as
done only when Alembic asks for the next one, i.e. after its transaction block has closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from . import _events as events
from . import _state
from ._db import heads_on, open_connection, read_heads
from ._journal import Journal
from ._plan import ancestors, clone_config, keep_loggers_enabled
from ._session_settings import lock_timed_out, migration_settings
from ._settings import Settings
from ._wait import acquire, pause, task_id
from .exceptions import (
    AutolockError,
    ConfigError,
    DatabaseUnavailable,
    GateClosed,
    LockLost,
    MigrationFailed,
)
from .locks import MigrationLock, ProcessOnlyLock
from .locks._session import close, open_side_connection

RUN_KEY = "alembic_autolock.run"
RESOLVE_COMMAND = "alembic-autolock resolve"

MigrationsFn = Callable[[Any, Any], Iterable[Any]]


def step_id(step: Any) -> str:
    ids = step.info.up_revision_ids
    return ",".join(ids) if ids else "base"


def gate_downgrade(settings: Settings) -> None:
    """Refuse a downgrade unless allow_downgrade is on for this environment."""
    if settings.allow_downgrade:
        return
    source = settings.source("allow_downgrade")
    events.emit(events.GATE_CLOSED, "warning", action="downgrade", environment=settings.environment)
    raise GateClosed(
        f"downgrade refused in environment {settings.environment!r} (allow_downgrade is false, "
        f"from {source}). To allow it, set ALEMBIC_AUTOLOCK_ALLOW_DOWNGRADE=true, or "
        "allow_downgrade = true in [alembic_autolock], or pass allow_downgrade=True.",
        action="downgrade",
        environment=settings.environment,
        setting="allow_downgrade",
    )


def runs_in_transactions(conn: Connection) -> bool:
    """Whether revisions on ``conn`` run inside database transactions that a failure or a dead
    process rolls back entirely: PostgreSQL and SQL Server, on a connection not in AUTOCOMMIT.
    (MySQL and MariaDB commit each DDL statement; Alembic runs SQLite DDL outside
    transactions.)"""
    if conn.dialect.name not in ("postgresql", "mssql"):
        return False
    return not autocommit(conn)


def autocommit(conn: Connection) -> bool:
    dbapi = conn.connection.dbapi_connection
    try:
        return bool(dbapi is not None and conn.dialect.detect_autocommit_setting(dbapi))
    except NotImplementedError:
        return False


@dataclass
class Tracker:
    """Follows one Alembic run. ``done`` lists the revisions whose step finished, in order."""

    settings: Settings
    lock: MigrationLock | None
    journal: Journal | None = None
    connection: Connection | None = None
    plan: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    current: str | None = None
    is_upgrade: bool = True
    started_heads: tuple[str, ...] = ()
    transactional: bool = True
    # the journal entry of the revision in progress, when it runs outside a transaction
    entry: int | None = None
    steps_seen: bool = False
    # empty_database = create_all: the metadata to create the tables from, instead of running
    # the revisions, and the revisions to stamp then (set by env.py after it looked)
    bootstrap: Any = None
    destination: str | tuple[str, ...] = "heads"
    bootstrapped: bool = False
    # statements the revision in progress sent so far (the one that failed included)
    step_statements: int = 0
    # seconds each revision of this run took, in order
    durations: dict[str, float] = field(default_factory=dict)
    # journal entries of revisions whose step ended inside the run's transaction (transaction
    # = all): finished only once that transaction committed (see ``committed``)
    uncommitted: list[int] = field(default_factory=list)
    _migrating: Connection | None = None
    _step_started: float = 0.0
    _stamp: bool = False

    def wrap(self, fn: MigrationsFn) -> MigrationsFn:
        def tracked(heads: Any, context: Any) -> Iterator[Any]:
            if self.connection is not None and context.connection is not self.connection:
                raise ConfigError(
                    "env.py configured Alembic with its own connection instead of "
                    "config.attributes['connection'], so it would migrate a database other than "
                    "the engine's (nothing was applied). Use "
                    "alembic_autolock.env.run_migrations() in env.py, or pass "
                    "config.attributes['connection'] to context.configure()."
                )
            self.started_heads = tuple(sorted(heads))
            self._migrating = context.connection
            try:
                if self.bootstrap is not None and not heads:
                    steps = self._create_all(context)
                else:
                    steps = list(fn(heads, context))
            except (CommandError, ResolutionError) as exc:
                raise ConfigError(f"{exc} (nothing was applied)") from exc
            self.plan = [step_id(s) for s in steps]
            self.steps_seen = bool(steps)
            self.is_upgrade = all(s.is_upgrade for s in steps)
            if any(not s.is_upgrade and not s.info.is_stamp for s in steps):
                gate_downgrade(self.settings)
            if steps:
                self.transactional = runs_in_transactions(context.connection)
                if self.journal is not None:
                    self._journal_autocommit_blocks(context)
                events.emit(
                    events.MIGRATION_STARTED,
                    direction="upgrade" if self.is_upgrade else "downgrade",
                    revisions=_summary(self.plan),
                    count=len(self.plan),
                    from_heads=list(self.started_heads),
                )
            count = self._count_statements(context.connection)
            try:
                for step in steps:
                    rev = step_id(step)
                    if self.lock is not None:
                        self.lock.check(revision=rev, applied=self.done)
                    self.current = rev
                    self._step_started = time.monotonic()
                    if (
                        self.journal is not None
                        and not self.transactional
                        and not step.info.is_stamp
                    ):
                        self._start_entry(rev)
                    self.step_statements = 0
                    self._stamp = bool(step.info.is_stamp)
                    yield step
                    self._finish_current()
                # Alembic asks for the next step only after the last one's transaction closed.
            finally:
                count.close()

        return tracked

    def _count_statements(self, conn: Connection) -> Any:
        """Count the statements each revision sends, until the returned handle is closed."""

        def counted(*_: Any) -> None:
            self.step_statements += 1

        event.listen(conn, "before_cursor_execute", counted)

        class _Handle:
            @staticmethod
            def close() -> None:
                with contextlib.suppress(Exception):
                    event.remove(conn, "before_cursor_execute", counted)

        return _Handle()

    def nothing_of_current_stayed(self) -> bool:
        """Whether the failure of the revision in progress left none of it applied: it ran in a
        transaction (rolled back), or the statement that failed was its first."""
        if self.current is None:
            return True
        return (self.transactional and self.entry is None) or self.step_statements <= 1

    def _create_all(self, context: Any) -> list[Any]:
        """An empty database: the target metadata's tables, then the heads stamped, in the
        run's transaction (where the database has transactional DDL)."""
        script = context.environment_context.script
        steps = list(script._stamp_revs(self.destination, ()))
        self.bootstrap.create_all(context.connection)
        self.bootstrapped = True
        events.emit(
            events.DATABASE_CREATED,
            tables=len(self.bootstrap.tables),
            stamped=[step_id(s) for s in steps],
        )
        return steps

    @property
    def direction(self) -> str:
        return "upgrade" if self.is_upgrade else "downgrade"

    def _journal_autocommit_blocks(self, context: Any) -> None:
        """A revision that enters ``autocommit_block()`` runs outside a transaction from there
        on: journal it before the block starts."""
        original = context.autocommit_block
        journal = self.journal

        @contextmanager
        def journalled() -> Iterator[None]:
            if journal is not None and self.entry is None and self.current is not None:
                self._start_entry(self.current, "autocommit_block")
            with original():
                yield

        context.autocommit_block = journalled

    def _start_entry(self, revision: str, detail: str | None = None) -> None:
        """Journal ``revision`` as started, once the lock is known to be held now (not at
        ``check``'s pace): work that no transaction can undo never begins, nor leaves an entry
        that makes the next run refuse, in a holder whose lock is already gone."""
        if self.lock is not None:
            self.lock.require_held()
        if self.journal is not None:
            self.entry = self.journal.start(revision, self.direction, detail)

    def _finish_current(self) -> None:
        if self.current is None:
            return
        took = time.monotonic() - self._step_started
        events.emit(
            events.MIGRATION_STEP,
            revision=self.current,
            direction=self.direction,
            duration_s=round(took, 4),
        )
        if not self._stamp:
            self.durations[self.current] = took
        self.done.append(self.current)
        self.current = None
        entry, self.entry = self.entry, None
        if entry is None or self.journal is None:
            return
        if self._migrating is not None and self._migrating.in_transaction():
            # transaction = all: the version table shows this step only once the run's
            # transaction commits; until then a crash or a failure of a later revision rolls
            # that back while what ran outside the transaction stays. The entry stays open.
            self.uncommitted.append(entry)
            return
        # the step is committed: if this write is lost, the next holder finds the
        # revision in the version table and closes the entry itself
        self.journal.finish(entry)

    def committed(self) -> None:
        """The run's transaction committed: finish the entries that waited for it."""
        if self.journal is None or not self.uncommitted:
            return
        if self._migrating is not None and self._migrating.in_transaction():
            return  # a caller's transaction, still open: the next holder closes them
        entries, self.uncommitted = self.uncommitted, []
        for entry in entries:
            self.journal.finish(entry)

    def next_revision(self) -> str | None:
        """The revision the run would have started next."""
        rest = self.plan[len(self.done) :]
        return rest[0] if rest else None


def _summary(revisions: list[str], limit: int = 10) -> list[str]:
    """The revisions of a run for an event: all of them, or the first and last few."""
    if len(revisions) <= limit:
        return revisions
    half = limit // 2
    return [*revisions[:half], f"... {len(revisions) - limit} more ...", *revisions[-half:]]


def plan_bootstrap(
    conn: Connection, settings: Settings, metadata: Any, tracker: Tracker, destination: Any
) -> None:
    """empty_database = create_all: on a database with no version table and none of the target
    metadata's tables, tell ``tracker`` to create them and stamp the heads instead of running
    the revisions. A database with some of those tables but no version table is refused."""
    if settings.empty_database != "create_all" or destination not in ("head", "heads"):
        return
    from sqlalchemy import inspect

    from .exceptions import UnversionedDatabase

    outside = not conn.in_transaction()
    try:
        look = inspect(conn)
        if look.has_table(settings.version_table, schema=settings.version_table_schema):
            return
        if metadata is None:
            raise ConfigError(
                "empty_database = create_all needs the models' metadata: pass "
                "run_migrations(target_metadata=Base.metadata) in env.py, or "
                "ensure_migrated(engine, target_metadata=Base.metadata)",
                key="empty_database",
                value=settings.empty_database,
                source=settings.source("empty_database"),
            )
        found = [t.fullname for t in metadata.sorted_tables if look.has_table(t.name, t.schema)]
    finally:
        if outside and conn.in_transaction():
            conn.rollback()  # Alembic must find no transaction open
    if found:
        raise UnversionedDatabase(tables=found, version_table=settings.version_table)
    tracker.bootstrap = metadata
    tracker.destination = destination


def describe_heads(heads: tuple[str, ...]) -> str:
    return "revision " + ", ".join(heads) if heads else "no revision (empty version table)"


def heads_now(
    lock: MigrationLock | None, engine: Engine, settings: Settings, masked_url: str
) -> tuple[str, ...]:
    """The heads, read on the lock's own session when the lock lives in the database (no new
    connection), else on a short connection of ``engine`` (retried while the server is full)."""
    session = lock.backend.session() if lock is not None else None
    if session is not None and not session.invalidated:
        try:
            return heads_on(session, settings)
        except SQLAlchemyError:
            pass  # the lock session is gone: read elsewhere
    return read_heads(engine, settings, masked_url, deadline=time.monotonic() + settings.timeout)


def heads_under_lock(
    lock: MigrationLock, engine: Engine, settings: Settings, masked_url: str
) -> tuple[str, ...]:
    """The second look, which decides whether to migrate: the heads read while the lock is
    still ours. Where the lock lives in the database they are read on the lock's own session,
    and a session that fails means the lock is gone (LockLost), never a reason to read on
    another connection and carry on; elsewhere the backend is asked first."""
    session = lock.backend.session()
    if session is None:
        lock.require_held()
        return read_heads(
            engine, settings, masked_url, deadline=time.monotonic() + settings.timeout
        )
    try:
        return heads_on(session, settings)
    except (SQLAlchemyError, DatabaseUnavailable) as exc:
        reason = lock.lost() or f"the lock session failed ({type(exc).__name__})"
        raise lock.lost_error(reason, revision=None, applied=[]) from exc


def _truth(
    tracker: Tracker, script: Any, engine: Engine, settings: Settings, masked_url: str
) -> tuple[tuple[str, ...] | None, list[str], str]:
    """The heads after a run stopped, the revisions of the run that stay applied, and a
    sentence saying so."""
    try:
        after = heads_now(tracker.lock, engine, settings, masked_url)
    except Exception as read_exc:  # the state is unknown; say so rather than guess
        return (
            None,
            list(tracker.done),
            "unknown: the database could not be read after the failure "
            f"({type(read_exc).__name__}); check it with `alembic current`",
        )
    have = ancestors(script, after)
    if tracker.is_upgrade:
        applied = [r for r in tracker.done if r in have]
    else:
        applied = [r for r in tracker.done if r not in have]
    if after == tracker.started_heads:
        state = f"database unchanged at {describe_heads(after)}"
        if tracker.done:
            state += f" (what this run did of {', '.join(tracker.done)} was rolled back)"
    else:
        state = f"database at {describe_heads(after)}"
    return after, applied, state


def _half_run(tracker: Tracker, engine: Engine) -> str:
    """What to add to the state when the revision in progress ran outside a transaction."""
    failed = tracker.current
    if failed is None or (tracker.transactional and tracker.entry is None):
        return ""
    if tracker.journal is not None:
        return (
            f"; {failed} ran outside a transaction, so what it did before it stopped is "
            "committed: the journal records it, and the next run will not re-run it until you "
            f"say what state it left (`{RESOLVE_COMMAND} {failed} --applied|--not-applied`)"
        )
    return (
        f"; {engine.dialect.name} migrations run without transactional DDL, so DDL statements "
        f"of {failed} that ran before the error are committed and must be repaired by hand (or "
        "the revision made idempotent) before retrying"
    )


def failure(
    exc: BaseException,
    tracker: Tracker,
    engine: Engine,
    settings: Settings,
    script: Any,
    masked_url: str,
) -> AutolockError:
    """The error that says which revision failed and what the database is at now: LockLost if
    the lock was lost meanwhile (the failure is most likely its consequence), else
    MigrationFailed."""
    lost = tracker.lock.lost() if tracker.lock is not None else None
    failed = tracker.current
    timed_out = lost is None and lock_timed_out(exc)
    retriable = timed_out and tracker.nothing_of_current_stayed()
    if lost is None and tracker.entry is not None and tracker.journal is not None:
        # if this fails, the journal still says "started": the next run refuses all the same
        with contextlib.suppress(SQLAlchemyError):
            if retriable:  # its first statement gave up waiting: nothing of it ran
                tracker.journal.close_unapplied(
                    tracker.entry, "gave up waiting for a table lock before any statement ran"
                )
                tracker.entry = None
            else:
                tracker.journal.fail(tracker.entry, f"{type(exc).__name__}: {exc}".splitlines()[0])
    after, applied, state = _truth(tracker, script, engine, settings, masked_url)
    state += _half_run(tracker, engine)
    if lost is not None and tracker.lock is not None:
        error: AutolockError = tracker.lock.lost_error(
            lost,
            revision=failed or tracker.next_revision(),
            applied=applied,
            state=state,
            during=failed is not None,
        )
        error.__cause__ = exc
        return error
    events.emit(
        events.MIGRATION_FAILED,
        "error",
        revision=failed,
        applied=applied,
        error=f"{type(exc).__name__}: {exc}".splitlines()[0],
        state=state,
    )
    return MigrationFailed(
        revision=failed,
        applied=applied,
        cause=exc,
        heads=after,
        state=state,
        upgrade=tracker.is_upgrade,
        hint=_lock_timeout_hint(settings, engine) if timed_out else "",
        lock_timeout=timed_out,
        retriable=retriable,
    )


def _lock_timeout_hint(settings: Settings, engine: Engine) -> str:
    who = (
        "SELECT pid, state, xact_start, query FROM pg_stat_activity WHERE pid = ANY "
        "(pg_blocking_pids(<the migration's pid>)), or look for long transactions in "
        "pg_stat_activity"
        if engine.dialect.name == "postgresql"
        else "SHOW PROCESSLIST (a long transaction that touched the table)"
    )
    return (
        f"A statement waited longer than ddl_lock_timeout ({settings.ddl_lock_timeout:g}s, from "
        f"{settings.source('ddl_lock_timeout')}) for a lock that another session holds on the "
        f"table, and gave up rather than block the queries queued behind it. Find the session "
        f"({who}), or run the migration when it has ended."
    )


def truthful_lost(
    exc: LockLost,
    tracker: Tracker,
    engine: Engine,
    settings: Settings,
    script: Any,
    masked_url: str,
) -> LockLost:
    """A LockLost raised before a revision, restated with what the database really shows
    (with ``transaction = all`` the revisions before it were rolled back with the rest)."""
    _, applied, state = _truth(tracker, script, engine, settings, masked_url)
    error = LockLost(
        backend=exc.backend,
        namespace=exc.namespace,
        reason=exc.reason,
        revision=exc.revision,
        applied=applied,
        state=state,
    )
    error.__cause__ = exc.__cause__
    return error


def check_persisted(
    tracker: Tracker, after: tuple[str, ...], script: ScriptDirectory, settings: Settings
) -> None:
    """Raise MigrationFailed if revisions that env.py ran are not in the database afterwards:
    env.py ran them in a transaction that nobody committed (the "silent no-op")."""
    have = ancestors(script, after)
    missing = [r for r in tracker.done if (r not in have) == tracker.is_upgrade]
    if not missing:
        return
    state = f"database unchanged at {describe_heads(after)}"
    summary = (
        f"env.py ran {', '.join(missing)} but the database does not show "
        f"{'them' if len(missing) > 1 else 'it'} afterwards"
    )
    events.emit(
        events.MIGRATION_FAILED, "error", revision=None, applied=[], error=summary, state=state
    )
    raise MigrationFailed(
        revision=None,
        applied=[r for r in tracker.done if r not in missing],
        cause=RuntimeError(summary),
        heads=after,
        state=state,
        upgrade=tracker.is_upgrade,
        summary=summary,
        hint="env.py probably ran the migrations in a transaction that was never committed "
        "(a connection that had executed a statement before context.configure()). Use "
        "alembic_autolock.env.run_migrations() in env.py.",
    )


@dataclass
class RunContext:
    """What ensure_migrated/upgrade/downgrade hand to env.py through ``config.attributes``."""

    settings: Settings
    connection: Connection
    tracker: Tracker
    target_metadata: Any = None


def journal_key(namespace: str) -> str:
    return hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()


@contextmanager
def open_journal(
    lock: MigrationLock, engine: Engine, settings: Settings
) -> Iterator[Journal | None]:
    """The journal of ``lock``'s namespace, written on the lock's own session when the lock lives
    in the database, else on a side connection of ``engine`` (closed afterwards); None where
    there is none (``lock = none``: others may be migrating; in-memory SQLite)."""
    if not lock.excludes_others or isinstance(lock.backend, ProcessOnlyLock):
        yield None
        return
    session = lock.backend.session()
    side: Connection | None = None

    def connection() -> Connection:
        nonlocal side
        if session is not None:
            return session
        if side is None:
            side = open_side_connection(engine)
        return side

    try:
        yield Journal(
            connection, key=journal_key(lock.namespace), schema=settings.version_table_schema
        )
    finally:
        if side is not None:
            close(side)


@contextmanager
def migration_session(
    lock: MigrationLock,
    conn: Connection,
    *,
    engine: Engine,
    settings: Settings,
    script: ScriptDirectory | None,
    owned: bool,
) -> Iterator[Journal | None]:
    """Hold the fence on the migration connection ``conn``, then check the journal (unless
    ``script`` is None): a revision left half-run raises MigrationInterrupted.

    ``owned``: the library opened ``conn`` (it may name the session); a connection handed over
    by the caller is left in the state its caller expects. Yields the journal, if any.
    """
    with (
        lock.fenced(conn, wait=settings.orphan_wait, owned=owned),
        migration_settings(conn, settings, owned=owned),
        open_journal(lock, engine, settings) as journal,
    ):
        if journal is not None and script is not None:
            try:
                # read after the fence: an earlier holder's session may have committed meanwhile
                have = ancestors(script, heads_on(journal.connection(), settings))

                def applied(revision: str, direction: str) -> bool:
                    return all((r in have) == (direction == "upgrade") for r in revision.split(","))

                journal.check(applied, resolve_hint=RESOLVE_COMMAND)
            except (SQLAlchemyError, DatabaseUnavailable) as exc:
                reason = lock.lost()  # the journal lives on the lock's session where it can
                if reason is None:
                    raise
                raise lock.lost_error(reason, revision=None, applied=[]) from exc
        yield journal


@contextmanager
def alembic_to_itself() -> Iterator[None]:
    """One Alembic run at a time in this process (``_state.alembic_lock``): its ``op`` and
    ``context`` proxies are process-wide, so revisions of two tenant schemas (or two databases)
    run by two threads at once would execute on each other's connections. Re-entered freely by
    the run that holds it; an event loop's tasks wait for it cooperatively."""
    me = task_id()
    if _state.alembic_owner == me:
        yield
        return
    guard = _state.alembic_lock
    acquire(guard, None)
    _state.alembic_owner = me
    try:
        yield
    finally:
        _state.alembic_owner = None
        guard.release()


def run_alembic(
    engine: Engine,
    *,
    migration_engine: Engine,
    cfg: Any,
    script: ScriptDirectory,
    settings: Settings,
    lock: MigrationLock,
    destination: str | tuple[str, ...],
    upgrade: bool,
    masked_url: str,
    target_metadata: Any = None,
    stamp: bool = False,
    check_journal: bool = True,
) -> tuple[Tracker, tuple[str, ...]]:
    """Run env.py for an upgrade or downgrade to ``destination`` on a fresh, fenced connection.

    The caller holds ``lock``. Returns the tracker (``done`` is what was applied) and the heads
    read afterwards; raises MigrationFailed, MigrationInterrupted, LockLost, GateClosed or
    ConfigError.
    """
    run_cfg = clone_config(cfg)
    tracker = Tracker(settings=settings, lock=lock)

    def migrations(heads: Any, context: Any) -> list[Any]:
        if stamp:
            return list(script._stamp_revs(destination, heads))  # what command.stamp does
        if upgrade:  # several destinations: start-up stopping short of a manual revision
            steps = script._upgrade_revs(destination, heads)  # type: ignore[arg-type]
        else:
            target = destination if isinstance(destination, str) else " ".join(destination)
            steps = script._downgrade_revs(target, heads)  # what command.downgrade does
        return list(steps)

    conn = open_connection(
        migration_engine, masked_url, deadline=time.monotonic() + settings.timeout
    )
    try:
        if autocommit(conn):  # an engine made with isolation_level="AUTOCOMMIT"
            conn.execution_options(isolation_level=conn.default_isolation_level)
        if migration_engine is not engine:  # lock_url: the application's execution options
            conn = conn.execution_options(**engine.get_execution_options())
        with migration_session(
            lock,
            conn,
            engine=migration_engine,
            settings=settings,
            script=script if check_journal else None,
            owned=True,
        ) as journal:
            tracker.journal = journal
            tracker.connection = conn
            run_cfg.attributes["connection"] = conn
            tracker.destination = destination
            run_cfg.attributes[RUN_KEY] = RunContext(settings, conn, tracker, target_metadata)
            try:
                with (
                    alembic_to_itself(),
                    keep_loggers_enabled(),
                    EnvironmentContext(
                        run_cfg,
                        script,
                        fn=tracker.wrap(migrations),
                        as_sql=False,
                        destination_rev=destination,
                    ),
                ):
                    script.run_env()
            except LockLost as exc:
                rollback_quietly(conn)
                raise truthful_lost(exc, tracker, engine, settings, script, masked_url) from exc
            except AutolockError:
                rollback_quietly(conn)
                raise
            except Exception as exc:
                rollback_quietly(conn)  # end the failed transaction before reading the state
                raise failure(exc, tracker, engine, settings, script, masked_url) from exc
            record_durations(journal, tracker)
    finally:
        if migration_engine.dialect.name == "sqlite":
            conn.close()  # an in-memory database lives as long as its one connection
        else:
            close(conn)  # a fenced, named server session never goes back to a pool
    after = heads_now(lock, engine, settings, masked_url)
    check_persisted(tracker, after, script, settings)
    return tracker, after


def relative_destination(destination: Any) -> bool:
    return isinstance(destination, str) and (destination[:1] in ("+", "-") or "@" in destination)


class DDLRetries:
    """Trying again a revision that failed only because a statement gave up waiting for a table
    lock (``ddl_lock_timeout``), with nothing of it left applied: up to ``ddl_retries`` times,
    after a growing, jittered pause (the long transaction that held the lock may end)."""

    BASE = 1.0
    CAP = 8.0

    def __init__(self, settings: Settings, *, relative: bool = False) -> None:
        self.settings = settings
        self.relative = relative
        self.attempts = 1
        self.applied: list[str] = []

    def again(self, exc: MigrationFailed) -> bool:
        """Whether to run again after ``exc`` (having paused); the caller raises otherwise.
        A relative destination (``+2``) that was partly reached is not run again: it would
        now mean further."""
        if not exc.retriable or self.attempts > self.settings.ddl_retries:
            return False
        if self.relative and exc.applied:
            return False
        delay = min(self.CAP, self.BASE * 2 ** (self.attempts - 1)) * random.uniform(0.5, 1.0)
        self.applied += [r for r in exc.applied if r not in self.applied]
        events.emit(
            events.MIGRATION_RETRY,
            "warning",
            revision=exc.revision,
            attempt=self.attempts,
            retries=self.settings.ddl_retries,
            delay_s=round(delay, 2),
            reason="ddl_lock_timeout",
        )
        pause(delay)
        self.attempts += 1
        return True

    def final(self, exc: MigrationFailed) -> MigrationFailed:
        return exc.tried(self.attempts) if self.attempts > 1 else exc


def record_durations(journal: Journal | None, tracker: Tracker) -> None:
    """After a run committed: finish the journal entries that waited for the commit, and keep
    how long each revision took, for ``time_budget`` (best effort: a run that succeeded is not
    failed by its bookkeeping; an entry left open is closed by the next holder, which finds
    its revision in the version table)."""
    with contextlib.suppress(SQLAlchemyError):
        tracker.committed()
    if journal is not None and tracker.durations:
        with contextlib.suppress(SQLAlchemyError):
            journal.record_durations(tracker.durations, tracker.direction)


def rollback_quietly(conn: Connection) -> None:
    try:
        conn.rollback()
    except Exception:  # a dead connection has nothing left to roll back
        conn.invalidate()
