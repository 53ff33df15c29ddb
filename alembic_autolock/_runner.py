"""ensure_migrated, upgrade, downgrade, status, resolve.

The shape of every run: the in-process cache, then the database, then the lock (waiting without
a database session), then a second look under the lock, then Alembic on a fresh connection that
holds the fence, with the journal checked first, then the release. The lock lives on its own
connection, never the one Alembic migrates on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from . import _events as events
from . import _state
from ._config import ConfigLike, main_option
from ._mask import mask_text, mask_url
from ._plan import (
    Plan,
    heads_on,
    open_connection,
    peek_heads,
    pending_steps,
    prepare,
    read_heads,
    unknown_heads,
)
from ._run import _summary, gate_downgrade, heads_now, open_journal, run_alembic
from ._settings import Settings
from ._wait import offload
from .exceptions import ConfigError, DatabaseAhead, PendingMigrations
from .locks import Holder, MigrationLock, ProcessOnlyLock, Watch, make_backend, make_fence
from .locks._session import lock_engine_for, side_connection


@dataclass(frozen=True)
class MigrationResult:
    """What one call did.

    ``action`` is one of ``cached`` (answered from the in-process cache), ``current`` (already
    at the target, nothing applied), ``upgraded``, ``downgraded``, ``created`` (an empty
    database built from the models and stamped at head: ``empty_database = create_all``;
    ``applied`` lists the stamped revisions), ``ahead`` (the database is at a revision these
    scripts do not know; nothing touched) or ``skipped`` (mode = off).
    """

    action: str
    applied: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    waited_s: float = 0.0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class PendingRevision:
    revision: str
    message: str | None


@dataclass(frozen=True)
class Status:
    """The database's migration state, the scripts' heads, and the lock."""

    current_heads: tuple[str, ...]
    script_heads: tuple[str, ...]
    pending: tuple[PendingRevision, ...]
    at_head: bool
    unknown_heads: tuple[str, ...]
    lock_backend: str
    namespace: str
    holders: tuple[Holder, ...] = ()
    holders_error: str | None = None
    database: str = ""
    mode: str = "upgrade"
    environment: str = "development"

    @property
    def ahead(self) -> bool:
        return bool(self.unknown_heads)

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "current_heads": list(self.current_heads),
            "script_heads": list(self.script_heads),
            "at_head": self.at_head,
            "ahead": self.ahead,
            "unknown_heads": list(self.unknown_heads),
            "pending": [{"revision": p.revision, "message": p.message} for p in self.pending],
            "lock": {
                "backend": self.lock_backend,
                "namespace": self.namespace,
                "holders": [h.as_dict() for h in self.holders],
                "error": self.holders_error,
            },
            "mode": self.mode,
            "environment": self.environment,
        }


def _remember(plan: Plan, heads: tuple[str, ...]) -> None:
    ttl = plan.settings.cache_ttl
    if ttl > 0 and frozenset(heads) == plan.script_heads:
        _state.heads[plan.cache_key] = (time.monotonic() + ttl, tuple(sorted(heads)))


def _handle_ahead(
    plan: Plan, heads: tuple[str, ...], unknown: list[str], started: float, waited: float = 0.0
) -> MigrationResult:
    events.use_context(plan.settings, plan.namespace)  # the alerts read it (on_ahead)
    events.emit(
        events.CHECK_AHEAD,
        "warning",
        database=plan.masked_url,
        heads=list(heads),
        unknown=unknown,
    )
    if plan.settings.on_ahead == "error":
        raise DatabaseAhead(unknown=unknown, heads=heads)
    return MigrationResult("ahead", (), heads, waited, time.perf_counter() - started)


def ensure_migrated(
    engine: Engine, *, config: ConfigLike = None, target_metadata: Any = None, **settings: Any
) -> MigrationResult:
    """Bring the database to head if the mode allows it, else verify that it is there.

    A call at head within ``cache_ttl`` of the last check is answered from memory. Otherwise
    the database is read; if revisions are pending, the lock is taken (waiting without holding
    a database session), the database is read again (another process may have migrated
    meanwhile), and the pending revisions are applied on a fresh, fenced connection.

    ``config`` is a path to alembic.ini or pyproject.toml, an ``alembic.config.Config``, or None
    (``$ALEMBIC_CONFIG``, else ./alembic.ini, else ./pyproject.toml). ``target_metadata`` is
    the models' MetaData, for ``empty_database = create_all`` when env.py does not pass one.
    ``settings`` override any setting (see docs/configuration.md).
    """
    started = time.perf_counter()
    # The prepared run (config, settings, scripts) is kept for the life of the process, keyed by
    # the arguments; only the database's answer expires (cache_ttl).
    try:
        memo: Any = (
            id(engine),
            config,
            id(target_metadata),
            tuple(sorted(settings.items())) if settings else (),
        )
        plan = _state.plans.get(memo)
    except TypeError:  # an unhashable setting value: no memo, everything still works
        memo, plan = None, None
    if plan is not None and plan.engine_ref() is engine:
        entry = _state.heads.get(plan.cache_key) if plan.settings.cache_ttl > 0 else None
        if entry is not None and entry[0] > time.monotonic():
            if events.listeners_of(events.CHECK_CACHED):  # metrics count it; nothing is logged
                events.notify(events.CHECK_CACHED, database=plan.masked_url, heads=list(entry[1]))
            return MigrationResult("cached", (), entry[1], 0.0, time.perf_counter() - started)
    else:
        plan = offload(prepare, engine, config, settings)  # file system work, off an event loop
        if memo is not None:
            if len(_state.plans) >= _state.MAX_PLANS:  # an app that makes engine after engine
                _state.plans.clear()
            _state.plans[memo] = plan
    s = plan.settings
    events.use_context(s, plan.namespace)
    if s.mode == "off":
        events.emit(events.MODE_OFF, database=plan.masked_url, environment=s.environment)
        return MigrationResult("skipped", elapsed_s=time.perf_counter() - started)

    if plan.process_local and s.mode == "upgrade":
        return _migrate(
            engine,
            plan,
            "heads",
            upgrade=True,
            started=started,
            settle=_at_head(plan),
            target_metadata=target_metadata,
        )
    conn = open_connection(engine, plan.masked_url, deadline=time.monotonic() + s.timeout)
    try:
        heads = heads_on(conn, s)
    except BaseException:
        conn.close()
        raise
    if frozenset(heads) == plan.script_heads:
        conn.close()
        _remember(plan, heads)
        events.emit(events.CHECK_CURRENT, database=plan.masked_url, heads=list(heads))
        return MigrationResult("current", (), heads, 0.0, time.perf_counter() - started)
    unknown = unknown_heads(plan.script, heads)
    if unknown:
        conn.close()
        return _handle_ahead(plan, heads, unknown, started)
    pending = pending_steps(plan.script, heads)
    events.emit(
        events.CHECK_PENDING,
        database=plan.masked_url,
        heads=list(heads),
        pending=[rev for rev, _ in pending],
        mode=s.mode,
    )
    if s.mode == "check":
        conn.close()
        raise PendingMigrations(
            pending=pending,
            heads=heads,
            command=_upgrade_command(plan),
            mode_source=s.source("mode"),
        )
    # the first look's connection makes the first attempt at the lock
    return _migrate(
        engine,
        plan,
        "heads",
        upgrade=True,
        started=started,
        settle=_at_head(plan),
        first=conn,
        target_metadata=target_metadata,
    )


def _at_head(plan: Plan) -> Callable[[tuple[str, ...]], bool]:
    """The waiter's test: another process brought the database to the scripts' heads (or
    beyond them: then there is nothing for this process to do either)."""

    def settled(heads: tuple[str, ...]) -> bool:
        return frozenset(heads) == plan.script_heads or bool(unknown_heads(plan.script, heads))

    return settled


def _upgrade_command(plan: Plan) -> str:
    """The command an operator runs to apply what check mode found pending."""
    parts = ["alembic-autolock"]
    where = plan.cfg.config_file_name or plan.cfg.toml_file_name
    if where:
        parts += ["-c", where]
    configured = main_option(plan.cfg, "sqlalchemy.url") if plan.cfg.config_file_name else None
    if configured is None or mask_url(configured) != plan.masked_url:
        parts += ["--url", f"'{plan.masked_url}'"]  # masked: the operator supplies the password
    # "heads": every branch, as ensure_migrated applies them ("head" fails on two heads)
    return " ".join([*parts, "upgrade", "heads" if len(plan.script_heads) > 1 else "head"])


def make_lock(engine: Engine, settings: Settings, namespace: str) -> tuple[MigrationLock, Engine]:
    """The runner's lock for ``engine``, and the engine its migration sessions come from (the
    lock_url engine when set: a fence needs a real server session, which a transaction-pooling
    proxy does not give)."""
    events.use_context(settings, namespace)  # every locked run passes here: alerts read it
    backend = make_backend(settings, engine, namespace)
    migration_engine = lock_engine_for(settings.lock_url) or engine
    fence = make_fence(backend, migration_engine, namespace)
    return MigrationLock(backend, namespace, settings.timeout, fence), migration_engine


def _watch(engine: Engine, plan: Plan, settle: Callable[[tuple[str, ...]], bool]) -> Watch:
    def read(conn: Connection | None) -> tuple[str, ...] | None:
        return peek_heads(conn, engine, plan.settings)

    return Watch(read=read, settled=settle)


def _done_by_other(
    engine: Engine, plan: Plan, heads: tuple[str, ...], waited: float, started: float
) -> MigrationResult:
    unknown = unknown_heads(plan.script, heads)
    if unknown:
        return _handle_ahead(plan, heads, unknown, started, waited)
    events.emit(
        events.MIGRATED_BY_OTHER,
        database=plan.masked_url,
        heads=list(heads),
        waited_s=round(waited, 3),
    )
    refresh_pool(engine, plan.settings, plan.masked_url)  # another process changed the schema
    _remember(plan, heads)
    return MigrationResult("current", (), heads, waited, time.perf_counter() - started)


def refresh_pool(engine: Engine, settings: Settings, masked_url: str) -> None:
    """After the schema changed, the application's pooled connections may hold prepared
    statements and type caches of the old one ("cached plan must not change result type" on
    PostgreSQL): replace the pool (connections checked out now are dropped when returned).
    Not for SQLite, whose driver re-prepares statements after a schema change by itself, and
    whose in-memory database lives only as long as its pool's one connection."""
    if not settings.refresh_pool or engine.dialect.name == "sqlite":
        return
    engine.dispose()
    events.emit(events.POOL_REFRESHED, database=masked_url)


def _second_look(lock: MigrationLock, engine: Engine, plan: Plan) -> tuple[str, ...]:
    return heads_now(lock, engine, plan.settings, plan.masked_url)


def _migrate(
    engine: Engine,
    plan: Plan,
    destination: str,
    *,
    upgrade: bool,
    started: float,
    settle: Callable[[tuple[str, ...]], bool] | None,
    first: Connection | None = None,
    target_metadata: Any = None,
) -> MigrationResult:
    s = plan.settings
    lock, migration_engine = make_lock(engine, s, plan.namespace)
    watch = _watch(engine, plan, settle) if settle is not None else None
    acquired = lock.acquire(watch, first=first)
    if not acquired.held:
        return _done_by_other(engine, plan, acquired.heads or (), acquired.waited_s, started)
    waited = acquired.waited_s
    try:
        heads = _second_look(lock, engine, plan)
        if settle is not None and settle(heads):
            return _done_by_other(engine, plan, heads, waited, started)
        _state.forget_heads(plan.cache_key)
        tracker, after = run_alembic(
            engine,
            migration_engine=migration_engine,
            cfg=plan.cfg,
            script=plan.script,
            settings=s,
            lock=lock,
            destination=destination,
            upgrade=upgrade,
            masked_url=plan.masked_url,
            target_metadata=target_metadata,
        )
    finally:
        lock.release()
    _remember(plan, after)
    elapsed = time.perf_counter() - started
    if tracker.bootstrapped:
        action = "created"
    else:
        action = ("upgraded" if upgrade else "downgraded") if tracker.done else "current"
    if action != "current":
        refresh_pool(engine, s, plan.masked_url)
    events.emit(
        events.MIGRATION_COMPLETED,
        database=plan.masked_url,
        action=action,
        applied=_summary(tracker.done),
        count=len(tracker.done),
        heads=list(after),
        waited_s=round(waited, 3),
        elapsed_s=round(elapsed, 3),
    )
    return MigrationResult(action, tuple(tracker.done), after, waited, elapsed)


def _check_revision(plan: Plan, revision: str) -> None:
    """Reject an unknown absolute revision before anything is locked or applied."""
    if revision in ("head", "heads", "base") or revision[:1] in ("+", "-") or "@" in revision:
        return
    try:
        found = plan.script.get_revisions(revision)
    except (CommandError, ResolutionError) as exc:
        raise ConfigError(
            f"unknown revision {revision!r}: {exc}. See `alembic history` for the revisions "
            "these scripts contain (nothing was applied).",
            key="revision",
            value=revision,
            source="argument",
        ) from exc
    if not found:
        raise ConfigError(f"unknown revision {revision!r} (nothing was applied)")


def upgrade(
    engine: Engine,
    revision: str = "head",
    *,
    config: ConfigLike = None,
    target_metadata: Any = None,
    **settings: Any,
) -> MigrationResult:
    """Upgrade to ``revision`` (default ``head``; ``heads`` for every branch) under the lock.

    Never served from the cache and not subject to ``mode``: an explicit upgrade is an
    operator's decision."""
    started = time.perf_counter()
    plan = prepare(engine, config, settings)
    _check_revision(plan, revision)
    settle = None
    if revision in ("head", "heads"):
        heads = read_heads(engine, plan.settings, plan.masked_url)
        if frozenset(heads) == plan.script_heads:
            _remember(plan, heads)
            return MigrationResult("current", (), heads, 0.0, time.perf_counter() - started)
        unknown = unknown_heads(plan.script, heads)
        if unknown:
            return _handle_ahead(plan, heads, unknown, started)
        settle = _at_head(plan)
    return _migrate(
        engine,
        plan,
        revision,
        upgrade=True,
        started=started,
        settle=settle,
        target_metadata=target_metadata,
    )


def downgrade(
    engine: Engine, revision: str, *, config: ConfigLike = None, **settings: Any
) -> MigrationResult:
    """Downgrade to ``revision`` under the lock, if ``allow_downgrade`` permits it here."""
    started = time.perf_counter()
    plan = prepare(engine, config, settings)
    gate_downgrade(plan.settings)
    _check_revision(plan, revision)
    return _migrate(engine, plan, revision, upgrade=False, started=started, settle=None)


def _holders(lock: MigrationLock, migration_engine: Engine) -> list[Holder]:
    """Who holds and waits for the lock, and (where the lock lives outside the database) which
    migration session holds the fence."""
    found = lock.backend.holders()
    if lock.fence is not None and lock.backend.name == "redis":
        with side_connection(migration_engine) as conn:
            found += lock.fence.holders(conn)
    return found


def status(engine: Engine, *, config: ConfigLike = None, **settings: Any) -> Status:
    """The current heads, the script heads, what is pending, and who holds the lock."""
    plan = prepare(engine, config, settings)
    s = plan.settings
    heads = read_heads(engine, s, plan.masked_url)
    unknown = unknown_heads(plan.script, heads)
    pending = (
        ()
        if unknown
        else tuple(PendingRevision(rev, msg) for rev, msg in pending_steps(plan.script, heads))
    )
    holders: tuple[Holder, ...] = ()
    error = None
    lock, migration_engine = make_lock(engine, s, plan.namespace)
    try:
        holders = tuple(_holders(lock, migration_engine))
    except Exception as exc:  # the state of the database is still worth reporting
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        error = mask_text(error, engine.url, s.lock_url, s.lock)
    return Status(
        current_heads=heads,
        script_heads=tuple(sorted(plan.script_heads)),
        pending=pending,
        at_head=frozenset(heads) == plan.script_heads,
        unknown_heads=tuple(unknown),
        lock_backend=lock.backend.name,
        namespace=plan.namespace,
        holders=holders,
        holders_error=error,
        database=plan.masked_url,
        mode=s.mode,
        environment=s.environment,
    )


def lock_holders(
    engine: Engine, *, config: ConfigLike = None, **settings: Any
) -> tuple[str, str, tuple[Holder, ...]]:
    """(backend name, namespace, who holds and who waits for the lock)."""
    plan = prepare(engine, config, settings)
    lock, migration_engine = make_lock(engine, plan.settings, plan.namespace)
    return lock.backend.name, plan.namespace, tuple(_holders(lock, migration_engine))


def unlock(
    engine: Engine,
    *,
    owner: str | None = None,
    force: bool = False,
    config: ConfigLike = None,
    **settings: Any,
) -> tuple[Holder, ...]:
    """Clear a stuck lock of this namespace: Redis by owner (or ``force``); PostgreSQL and MySQL
    only with ``force``, by ending the holding session. With ``force`` the migration session
    that holds the fence is ended too. Returns who was cleared."""
    plan = prepare(engine, config, settings)
    lock, migration_engine = make_lock(engine, plan.settings, plan.namespace)
    cleared = list(lock.backend.unlock(owner=owner, force=force))
    if force and lock.fence is not None and lock.backend.name == "redis":
        with side_connection(migration_engine) as conn:
            fenced = lock.fence.holders(conn)
            lock.fence.end(conn, fenced)
        cleared += fenced
    for holder in cleared:
        events.emit(
            events.LOCK_CLEARED,
            "warning",
            backend=lock.backend.name,
            namespace=plan.namespace,
            holder=holder.describe(),
            forced=force,
        )
    return tuple(cleared)


def resolve(
    engine: Engine,
    revision: str,
    *,
    applied: bool,
    config: ConfigLike = None,
    **settings: Any,
) -> tuple[str, ...]:
    """Say what state an interrupted revision left, under the lock: ``applied`` (its changes
    are in place: the version table is stamped to show it done) or not (they were undone: it
    will run again). Closes its journal entries; returns the heads afterwards."""
    started = time.perf_counter()
    plan = prepare(engine, config, settings)
    _check_revision(plan, revision)
    s = plan.settings
    lock, migration_engine = make_lock(engine, s, plan.namespace)
    if not lock.excludes_others or isinstance(lock.backend, ProcessOnlyLock):
        raise ConfigError(
            f"lock = {s.lock} keeps no journal for this database: there is nothing to resolve"
        )
    lock.acquire()
    try:
        with open_journal(lock, migration_engine, s) as journal:
            entry = journal.latest_open() if journal is not None else None
            if entry is None or entry.revision != revision:
                what = (
                    f"the open entry is for {entry.revision}"
                    if entry is not None
                    else "nothing is open"
                )
                raise ConfigError(
                    f"the journal has no interrupted run of revision {revision} ({what}); nothing "
                    "to resolve",
                    key="revision",
                    value=revision,
                    source="argument",
                )
            heads = _second_look(lock, engine, plan)
            if applied:
                target = _state_after(plan.script, entry.revision, entry.direction)
                run_alembic(
                    engine,
                    migration_engine=migration_engine,
                    cfg=plan.cfg,
                    script=plan.script,
                    settings=s,
                    lock=lock,
                    destination=target,
                    upgrade=True,
                    masked_url=plan.masked_url,
                    stamp=True,
                    check_journal=False,
                )
            if journal is not None:
                journal.resolve(revision, applied)
            heads = _second_look(lock, engine, plan)
    finally:
        lock.release()
    _state.forget_heads(plan.cache_key)
    events.emit(
        events.MIGRATION_RESOLVED,
        "warning",
        revision=revision,
        applied=applied,
        heads=list(heads),
        elapsed_s=round(time.perf_counter() - started, 3),
    )
    return heads


def _state_after(script: Any, revision: str, direction: str) -> str | tuple[str, ...]:
    """The stamp target that shows ``revision``'s step as done."""
    if direction == "upgrade":
        return revision
    down = script.get_revision(revision).down_revision
    if not down:
        return "base"
    return down if isinstance(down, str) else tuple(down)
