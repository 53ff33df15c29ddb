"""Running Alembic under the lock: progress tracking, the per-revision lock check, the gate, and
turning failures into errors that say what state the database was left in.

Alembic calls the command's "migrations function" ``fn(heads, context)`` inside
``MigrationContext.run_migrations`` and iterates over the steps it returns, running each in its
own transaction block. :class:`Tracker` wraps that function in a generator, so it sees the plan
before anything runs (the gate and the connection check happen there, with nothing applied),
checks the lock before each revision starts, and knows which revision was in progress when
something raised. A step counts as done only when Alembic asks for the next one, i.e. after its
transaction block has closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from . import _events as events
from . import _sessions as sessions
from ._plan import ancestors, clone_config, keep_loggers_enabled, read_heads
from ._settings import Settings
from .exceptions import AutolockError, ConfigError, GateClosed, MigrationFailed
from .locks import MigrationLock

RUN_KEY = "alembic_autolock.run"

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


@dataclass
class Tracker:
    """Follows one Alembic run. ``done`` lists the revisions whose step finished, in order."""

    settings: Settings
    lock: MigrationLock | None
    connection: Connection | None = None
    plan: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    current: str | None = None
    is_upgrade: bool = True
    started_heads: tuple[str, ...] = ()
    _step_started: float = 0.0

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
            try:
                steps = list(fn(heads, context))
            except (CommandError, ResolutionError) as exc:
                raise ConfigError(f"{exc} (nothing was applied)") from exc
            self.plan = [step_id(s) for s in steps]
            self.is_upgrade = all(s.is_upgrade for s in steps)
            if any(not s.is_upgrade and not s.info.is_stamp for s in steps):
                gate_downgrade(self.settings)
            if steps:
                events.emit(
                    events.MIGRATION_STARTED,
                    direction="upgrade" if self.is_upgrade else "downgrade",
                    revisions=self.plan,
                    from_heads=list(self.started_heads),
                )
            for step in steps:
                rev = step_id(step)
                if self.lock is not None:
                    self.lock.check(revision=rev, applied=self.done)
                self.current = rev
                self._step_started = time.monotonic()
                yield step
                self._finish_current()
            # Alembic asks for the next step only after the last one's transaction closed.

        return tracked

    def _finish_current(self) -> None:
        if self.current is None:
            return
        events.emit(
            events.MIGRATION_STEP,
            revision=self.current,
            direction="upgrade" if self.is_upgrade else "downgrade",
            duration_s=round(time.monotonic() - self._step_started, 4),
        )
        self.done.append(self.current)
        self.current = None


def describe_heads(heads: tuple[str, ...]) -> str:
    return "revision " + ", ".join(heads) if heads else "no revision (empty version table)"


def failure(
    exc: BaseException,
    tracker: Tracker,
    engine: Engine,
    settings: Settings,
    script: Any,
    masked_url: str,
) -> MigrationFailed:
    """A MigrationFailed that says which revision failed and what the database is at now."""
    try:
        after: tuple[str, ...] | None = read_heads(engine, settings, masked_url)
    except Exception as read_exc:  # the state is unknown; say so rather than guess
        after = None
        state = (
            "unknown: the database could not be read after the failure "
            f"({type(read_exc).__name__}); check it with `alembic current`"
        )
    failed = tracker.current
    if after is not None:
        have = ancestors(script, after)
        if tracker.is_upgrade:
            applied = [r for r in tracker.done if r in have]
        else:
            applied = [r for r in tracker.done if r not in have]
        if after == tracker.started_heads:
            state = f"database unchanged at {describe_heads(after)}"
        else:
            state = f"database at {describe_heads(after)}"
        if not transactional_ddl(engine) and failed is not None:
            state += (
                f"; {engine.dialect.name} migrations run without transactional DDL, so DDL "
                f"statements of {failed} that ran before the error are committed and must be "
                "repaired by hand (or the revision made idempotent) before retrying"
            )
    else:
        applied = list(tracker.done)
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
    )


def transactional_ddl(engine: Engine) -> bool:
    """Whether Alembic runs DDL inside transactions on this dialect (PostgreSQL, MSSQL: yes;
    MySQL, MariaDB, SQLite, Oracle: no)."""
    from alembic.ddl.impl import DefaultImpl

    return bool(DefaultImpl.get_by_dialect(engine.dialect).transactional_ddl)


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


def run_alembic(
    engine: Engine,
    *,
    cfg: Any,
    script: ScriptDirectory,
    settings: Settings,
    lock: MigrationLock,
    destination: str,
    upgrade: bool,
    masked_url: str,
    namespace: str,
) -> tuple[Tracker, tuple[str, ...]]:
    """Run env.py for an upgrade or downgrade to ``destination`` on a fresh connection.

    The caller holds ``lock``. Returns the tracker (``done`` is what was applied) and the heads
    read afterwards; raises MigrationFailed, LockLost, GateClosed or ConfigError.
    """
    run_cfg = clone_config(cfg)
    tracker = Tracker(settings=settings, lock=lock)

    def migrations(heads: Any, context: Any) -> list[Any]:
        if upgrade:
            steps = script._upgrade_revs(destination, heads)  # what command.upgrade does
        else:
            steps = script._downgrade_revs(destination, heads)  # what command.downgrade does
        return list(steps)

    from ._plan import connect

    with connect(engine, masked_url) as conn:
        # Nothing may stay open on this connection when Alembic configures it: a statement
        # would autobegin a transaction that Alembic then treats as the caller's and never
        # commits. The session setting the tag makes is committed; the session is closed, not
        # pooled, after.
        tagged = sessions.tags_sessions(engine)
        if tagged:
            sessions.tag(conn, namespace)
        tracker.connection = conn
        run_cfg.attributes["connection"] = conn
        run_cfg.attributes[RUN_KEY] = RunContext(settings, conn)
        try:
            with (
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
        except AutolockError:
            raise
        except Exception as exc:
            _rollback_quietly(conn)  # end the failed transaction before reading the state
            raise failure(exc, tracker, engine, settings, script, masked_url) from exc
        finally:
            if tagged:
                conn.invalidate()  # a tagged session never goes back to the pool
    after = read_heads(engine, settings, masked_url)
    check_persisted(tracker, after, script, settings)
    return tracker, after


def _rollback_quietly(conn: Connection) -> None:
    try:
        conn.rollback()
    except Exception:  # a dead connection has nothing left to roll back
        conn.invalidate()
