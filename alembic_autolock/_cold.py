"""ensure_migrated: the path every start of every process takes.

Three answers, cheapest first:

1. **Cached**: this process found the database at head less than ``cache_ttl`` ago (a
   dictionary lookup).
2. **Cold, at head**: a fresh process reads the configuration with the standard library
   (``LightConfig``), takes the history's heads from the manifest if it still matches the files
   (``_manifest.py``), reads the database's heads in one statement, and finds them equal.
   Alembic is not imported and no revision file is executed.
3. **Everything else** (no manifest yet, revisions pending, a database ahead, ``mode`` that
   needs the scripts): the runner (``_runner.py``), which loads the history with Alembic, and
   continues on the connection the cold look opened.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from sqlalchemy.engine import Connection, Engine

from . import _events as events
from . import _manifest as manifest
from . import _state
from ._config import ConfigLike, light_config
from ._db import heads_on, open_connection
from ._results import MigrationResult, PendingRevision
from ._settings import Settings, resolve_settings


class ColdPlan:
    """What the at-head answer needs: the settings, the history's heads (from the manifest) and
    the cache key the runner's plan would have."""

    process_local = False

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        script_dir: str,
        heads: frozenset[str],
        settled: manifest.Settled,
    ) -> None:
        self.settings = settings
        self.script_heads = heads
        self.settled = settled
        self.engine_ref = weakref.ref(engine)
        self.cache_key = (
            _state.engine_token(engine),
            script_dir,
            settings.version_table_schema,
            settings.version_table,
        )
        self._url = engine.url

    @cached_property
    def masked_url(self) -> str:
        from ._mask import mask_url

        return mask_url(self._url)


def remember(
    plan: Any, heads: tuple[str, ...], pending: tuple[PendingRevision, ...] | None = None
) -> None:
    """Trust "at these heads" for ``cache_ttl`` seconds: when they are the scripts', or when
    start-up has nothing to apply there and ``pending`` waits for a job."""
    ttl = plan.settings.cache_ttl
    if ttl > 0 and (pending is not None or frozenset(heads) == plan.script_heads):
        _state.heads[plan.cache_key] = (
            time.monotonic() + ttl,
            tuple(sorted(heads)),
            pending or (),
        )


def emit_held_back(masked_url: str, held: tuple[PendingRevision, ...], command: str | None) -> None:
    """Start-up left revisions for a job: say so, every time (a warning: someone must run
    it)."""
    events.emit(
        events.MANUAL_PENDING,
        "warning",
        database=masked_url,
        pending=[p.revision for p in held],
        command=command or "alembic-autolock upgrade",
    )


def cold_plan(engine: Engine, config: ConfigLike, overrides: Mapping[str, Any]) -> Any:
    """A ColdPlan when the history's heads are known without loading it; else None (then the
    runner prepares a full plan, and raises the configuration errors with their context)."""
    if not isinstance(engine, Engine) or (
        engine.dialect.name == "sqlite" and (engine.url.database in (None, "", ":memory:"))
    ):
        return None
    try:
        cfg = light_config(config, environ=os.environ)
        if cfg is None:
            return None
        settings = resolve_settings(overrides, cfg)
    except Exception:
        return None
    if settings.mode == "off":
        return _Off(engine, settings)
    found = manifest.lookup(cfg, settings.cache_dir)
    if found is None:
        return None
    return ColdPlan(engine, settings, *found)


class _Off:
    """mode = off: nothing to read at all."""

    process_local = False

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.settings = settings
        self._url = engine.url


def ensure_migrated(
    engine: Engine, *, config: ConfigLike = None, target_metadata: Any = None, **settings: Any
) -> MigrationResult:
    """Bring the database to head if the mode allows it, else verify that it is there.

    A call at head within ``cache_ttl`` of the last check is answered from memory; the first
    call of a process at head reads the database's heads and compares them with the history's,
    known without loading it when the files have not changed since a process last loaded it.
    Otherwise, if revisions are pending, the lock is taken (waiting without holding a database
    session), the database is read again (another process may have migrated meanwhile), and
    the pending revisions are applied on a fresh, fenced connection.

    ``config`` is a path to alembic.ini or pyproject.toml, an ``alembic.config.Config``, or None
    (``$ALEMBIC_CONFIG``, else ./alembic.ini, else ./pyproject.toml). ``target_metadata`` is
    the models' MetaData, for ``empty_database = create_all`` when env.py does not pass one.
    ``settings`` override any setting (see docs/configuration.md).
    """
    started = time.perf_counter()
    # The prepared plan is kept for the life of the process, keyed by the arguments; only the
    # database's answer expires (cache_ttl).
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
    if plan is not None and getattr(plan, "engine_ref", lambda: None)() is engine:
        if plan.settings.cache_ttl > 0:
            entry = _state.heads.get(plan.cache_key)
            if entry is not None and entry[0] > time.monotonic():
                if events.listeners_of(events.CHECK_CACHED):  # metrics count it; not logged
                    events.notify(
                        events.CHECK_CACHED, database=plan.masked_url, heads=list(entry[1])
                    )
                return MigrationResult(
                    "cached", (), entry[1], 0.0, time.perf_counter() - started, entry[2]
                )
    elif plan is None or isinstance(plan, _Off):
        plan = cold_plan(engine, config, settings)
        if plan is not None and memo is not None and not isinstance(plan, _Off):
            if len(_state.plans) >= _state.MAX_PLANS:  # an app that makes engine after engine
                _state.plans.clear()
            _state.plans[memo] = plan
    if isinstance(plan, _Off):
        events.emit(events.MODE_OFF, environment=plan.settings.environment)
        return MigrationResult("skipped", elapsed_s=time.perf_counter() - started)
    looked: tuple[Connection, tuple[str, ...]] | None = None
    if isinstance(plan, ColdPlan):
        s = plan.settings
        conn = open_connection(engine, deadline=time.monotonic() + s.timeout)
        try:
            heads = heads_on(conn, s)
        except BaseException:
            conn.close()
            raise
        found = frozenset(heads)
        if found == plan.script_heads or found in plan.settled:
            conn.close()
            held = tuple(
                PendingRevision(rev, msg, manual=True) for rev, msg in plan.settled.get(found, ())
            )
            remember(plan, heads, held if held else None)
            if events.worth(events.CHECK_CURRENT):
                events.use_context(plan.settings, plan.settings.namespace or "")  # metrics = off
                events.emit(events.CHECK_CURRENT, database=plan.masked_url, heads=list(heads))
            if held:
                emit_held_back(plan.masked_url, held, None)
            return MigrationResult("current", (), heads, 0.0, time.perf_counter() - started, held)
        looked = (conn, heads)  # the runner goes on with this connection and this answer
    from ._runner import migrate_or_check

    return migrate_or_check(
        engine,
        config=config,
        target_metadata=target_metadata,
        overrides=settings,
        memo=memo,
        started=started,
        looked=looked,
    )
