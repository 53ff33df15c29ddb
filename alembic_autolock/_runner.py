"""ensure_migrated, upgrade, downgrade, status, resolve.

The shape of every run: the in-process cache, then the database, then the lock (waiting without
a database session), then a second look under the lock, then Alembic on a fresh connection that
holds the fence, with the journal checked first, then the release. The lock lives on its own
connection, never the one Alembic migrates on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from . import _events as events
from . import _state
from ._cold import emit_held_back
from ._cold import remember as _remember
from ._config import ConfigLike, main_option
from ._db import heads_on, open_connection, peek_heads, read_heads
from ._mask import mask_text, mask_url
from ._plan import Plan, pending_steps, prepare, unknown_heads
from ._results import MigrationResult, PendingRevision, Status
from ._run import (
    DDLRetries,
    _summary,
    gate_downgrade,
    heads_under_lock,
    open_journal,
    relative_destination,
    run_alembic,
)
from ._settings import Settings
from ._startup import StartupPlan, known_durations, read_durations_file, startup_plan
from ._wait import offload
from .exceptions import (
    ConfigError,
    DatabaseAhead,
    MigrationFailed,
    PendingMigrations,
    TimeBudgetExceeded,
)
from .locks import Holder, MigrationLock, ProcessOnlyLock, Watch, make_backend, make_fence
from .locks._session import lock_engine_for, side_connection


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


def migrate_or_check(
    engine: Engine,
    *,
    config: ConfigLike,
    target_metadata: Any,
    overrides: dict[str, Any],
    memo: Any,
    started: float,
    looked: tuple[Connection, tuple[str, ...]] | None,
) -> MigrationResult:
    """ensure_migrated beyond the cold answer (``_cold.py``): with the history loaded, check,
    and migrate under the lock if the mode allows it. ``looked`` is the cold look's connection
    and the heads it read, when there was one."""
    plan = _state.plans.get(memo) if memo is not None else None
    if not isinstance(plan, Plan) or plan.engine_ref() is not engine:
        if looked is not None:  # do not hold a connection while the history loads
            looked[0].close()
            looked = None
        plan = offload(prepare, engine, config, overrides)  # file system work, off a loop
        if memo is not None:
            if len(_state.plans) >= _state.MAX_PLANS:  # an app that makes engine after engine
                _state.plans.clear()
            _state.plans[memo] = plan
    s = plan.settings
    events.use_context(s, plan.namespace)
    if s.mode == "off":
        if looked is not None:
            looked[0].close()
        events.emit(events.MODE_OFF, database=plan.masked_url, environment=s.environment)
        return MigrationResult("skipped", elapsed_s=time.perf_counter() - started)

    if plan.process_local and s.mode == "upgrade":
        return _migrate(
            engine,
            plan,
            "heads",
            upgrade=True,
            started=started,
            settle=_startup_settled(plan),
            target_metadata=target_metadata,
            startup=True,
        )
    if looked is not None:
        conn, heads = looked
    else:
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
    startup = startup_plan(plan.script, heads, plan.manual)
    if startup.destination is None:  # only revisions kept for a job are pending
        conn.close()
        return _held_back(plan, heads, startup, started)
    by_rev = dict(pending_steps(plan.script, heads))
    events.emit(
        events.CHECK_PENDING,
        database=plan.masked_url,
        heads=list(heads),
        pending=list(startup.applies),
        mode=s.mode,
    )
    if s.mode == "check":
        conn.close()
        raise PendingMigrations(
            pending=[(rev, by_rev.get(rev)) for rev in startup.applies],
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
        settle=_startup_settled(plan),
        first=conn,
        target_metadata=target_metadata,
        startup=True,
    )


def _held_back(
    plan: Plan,
    heads: tuple[str, ...],
    startup: StartupPlan,
    started: float,
    waited: float = 0.0,
    action: str = "current",
) -> MigrationResult:
    """Start-up found nothing it may apply: what is pending waits for a job."""
    command = _upgrade_command(plan)
    _remember(plan, heads, startup.held_back)
    if plan.recorder is not None:
        plan.recorder.settle(heads, [(p.revision, p.message) for p in startup.held_back])
    emit_held_back(plan.masked_url, startup.held_back, command)
    return MigrationResult(
        action, (), heads, waited, time.perf_counter() - started, startup.held_back, command
    )


def _startup_settled(plan: Plan) -> Callable[[tuple[str, ...]], bool]:
    """The waiter's test at start-up: another process applied everything start-up may apply
    (what is left, if anything, waits for a job), or went beyond these scripts."""
    if not plan.manual:
        return _at_head(plan)

    def settled(heads: tuple[str, ...]) -> bool:
        if frozenset(heads) == plan.script_heads or unknown_heads(plan.script, heads):
            return True
        return startup_plan(plan.script, heads, plan.manual).destination is None

    return settled


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
    if plan.manual and frozenset(heads) != plan.script_heads:
        return _held_back(
            plan, heads, startup_plan(plan.script, heads, plan.manual), started, waited
        )
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
    return heads_under_lock(lock, engine, plan.settings, plan.masked_url)


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
    startup: bool = False,
) -> MigrationResult:
    """Take the lock, look again, run Alembic to ``destination``. At ``startup``, the
    destination is what start-up may apply from the heads found under the lock (revisions kept
    for a job stay pending), within ``time_budget``."""
    s = plan.settings
    held: tuple[PendingRevision, ...] = ()
    lock, migration_engine = make_lock(engine, s, plan.namespace)
    watch = _watch(engine, plan, settle) if settle is not None else None
    acquired = lock.acquire(watch, first=first)
    try:  # at once: whatever interrupts the run from here releases the lock (idempotent)
        if not acquired.held:
            return _done_by_other(engine, plan, acquired.heads or (), acquired.waited_s, started)
        waited = acquired.waited_s
        heads = _second_look(lock, engine, plan)
        if settle is not None and settle(heads):
            return _done_by_other(engine, plan, heads, waited, started)
        target: str | tuple[str, ...] = destination
        if startup and plan.manual:
            chosen = startup_plan(plan.script, heads, plan.manual)
            if chosen.destination is None:
                return _held_back(plan, heads, chosen, started, waited)
            target, held = chosen.destination, chosen.held_back
        if startup and s.time_budget > 0:
            _within_budget(lock, migration_engine, plan, heads, target)
        _state.forget_heads(plan.cache_key)
        retries = DDLRetries(s, relative=relative_destination(destination))
        while True:
            try:
                tracker, after = run_alembic(
                    engine,
                    migration_engine=migration_engine,
                    cfg=plan.cfg,
                    script=plan.script,
                    settings=s,
                    lock=lock,
                    destination=target,
                    upgrade=upgrade,
                    masked_url=plan.masked_url,
                    target_metadata=target_metadata,
                )
                break
            except MigrationFailed as exc:
                if not retries.again(exc):
                    raise retries.final(exc) from exc.__cause__
    finally:
        lock.release()
    _remember(plan, after, held or None)
    elapsed = time.perf_counter() - started
    applied = [*retries.applied, *(r for r in tracker.done if r not in retries.applied)]
    if tracker.bootstrapped:
        action = "created"
    else:
        action = ("upgraded" if upgrade else "downgraded") if applied else "current"
    if action != "current":
        refresh_pool(engine, s, plan.masked_url)
    events.emit(
        events.MIGRATION_COMPLETED,
        database=plan.masked_url,
        action=action,
        applied=_summary(applied),
        count=len(applied),
        heads=list(after),
        waited_s=round(waited, 3),
        elapsed_s=round(elapsed, 3),
    )
    command = None
    if held:
        command = _upgrade_command(plan)
        if plan.recorder is not None:
            plan.recorder.settle(after, [(p.revision, p.message) for p in held])
        emit_held_back(plan.masked_url, held, command)
    return MigrationResult(action, tuple(applied), after, waited, elapsed, held, command)


def _within_budget(
    lock: MigrationLock,
    migration_engine: Engine,
    plan: Plan,
    heads: tuple[str, ...],
    target: str | tuple[str, ...],
) -> None:
    """Refuse to begin a start-up run whose revisions are known to take longer than
    ``time_budget`` (durations from this database's journal and ``durations_file``)."""
    s = plan.settings
    steps = plan.script._upgrade_revs(target, heads)  # type: ignore[arg-type]
    revisions = tuple(step.revision.revision for step in steps)
    sources: list[dict[str, float]] = []
    with open_journal(lock, migration_engine, s) as journal:
        if journal is not None:
            sources.append(journal.durations())
    if s.durations_file:
        sources.append(read_durations_file(s.durations_file))
    known = known_durations(revisions, *sources)
    if sum(known.values()) <= s.time_budget:
        return
    error = TimeBudgetExceeded(
        revisions=revisions,
        known=known,
        budget=s.time_budget,
        budget_source=s.source("time_budget"),
        environment=s.environment,
        command=_upgrade_command(plan),
    )
    events.emit(
        events.OVER_BUDGET,
        "warning",
        database=plan.masked_url,
        revisions=_summary(list(revisions)),
        known_s=round(error.total_s, 3),
        time_budget=s.time_budget,
    )
    raise error


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
    if pending and plan.manual:
        held = {p.revision for p in startup_plan(plan.script, heads, plan.manual).held_back}
        pending = tuple(PendingRevision(p.revision, p.message, p.revision in held) for p in pending)
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


def durations(engine: Engine, *, config: ConfigLike = None, **settings: Any) -> dict[str, float]:
    """How long each revision took when it was applied to this database (the longest recorded
    upgrade), from the library's journal: what ``durations_file`` carries to another database
    for ``time_budget``."""
    plan = prepare(engine, config, settings)
    lock, migration_engine = make_lock(engine, plan.settings, plan.namespace)
    with open_journal(lock, migration_engine, plan.settings) as journal:
        return journal.durations() if journal is not None else {}
