"""The whole body of an env.py.

An existing project adopts alembic_autolock by replacing the body of its env.py with::

    from alembic_autolock.env import run_migrations
    from myapp.models import Base

    run_migrations(target_metadata=Base.metadata)

Then ``alembic upgrade head`` checks the database first (at head: no lock at all), else takes
the same lock as ``ensure_migrated`` (waiting without a database session), fences its migration
session and checks the journal; ``alembic upgrade head --sql`` still works offline; and when
ensure_migrated/upgrade/downgrade run env.py, it uses their connection and their lock.
"""

from __future__ import annotations

import logging.config
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import _state
from ._config import ini_section, main_option
from ._db import heads_on, open_connection, peek_heads, unavailable
from ._mask import mask_url, parse_url
from ._plan import derive_namespace
from ._run import (
    RUN_KEY,
    DDLRetries,
    RunContext,
    Tracker,
    autocommit,
    failure,
    gate_downgrade,
    heads_now,
    migration_session,
    plan_bootstrap,
    record_durations,
    relative_destination,
    rollback_quietly,
    truthful_lost,
)
from ._settings import Settings, resolve_settings
from ._wait import run_for_engine
from .exceptions import AutolockError, ConfigError, LockLost, MigrationFailed
from .locks import MigrationLock, Watch
from .locks._session import close

__all__ = ["run_migrations"]

# configure() options that only mean something when Alembic renders SQL (--sql), and that break
# an online run ("Can't use literal_binds setting without as_sql mode").
OFFLINE_ONLY = frozenset({"literal_binds", "dialect_opts", "dialect_name", "output_buffer"})
_OFFLINE_DEFAULTS: dict[str, Any] = {"literal_binds": True, "dialect_opts": {"paramstyle": "named"}}
_RESERVED = {
    "connection": "the connection comes from config.attributes['connection'], -x url=..., or "
    "sqlalchemy.url; to set up the migration connection, pass connection_setup=",
    "url": "the URL comes from -x url=... or sqlalchemy.url",
    "fn": "Alembic's command supplies it; to migrate by another path (a custom "
    "MigrationContext), run it inside `with alembic_autolock.migration_lock(engine) as conn:`",
    "as_sql": "Alembic's --sql option sets it",
}

ConnectionSetup = Callable[[Connection], object]


def run_migrations(
    target_metadata: Any = None,
    *,
    connection_setup: ConnectionSetup | None = None,
    online: dict[str, Any] | None = None,
    offline: dict[str, Any] | None = None,
    **configure_kwargs: Any,
) -> None:
    """Configure Alembic and run the migrations of the current command, under the lock.

    ``configure_kwargs`` go to ``context.configure()`` (``include_schemas``,
    ``render_as_batch``, ``compare_type`` ...); options that only make sense when rendering SQL
    (``literal_binds``, ``dialect_opts``) are used only by ``--sql``. ``online`` and
    ``offline`` add options for one mode only. ``version_table`` and ``version_table_schema``
    belong in the ``[alembic_autolock]`` settings so that the check reads the table the upgrade
    writes; passing a different value here is an error.

    ``connection_setup(connection)`` runs on the migration connection (never the lock's) before
    Alembic is configured: ``SET`` statements, the application's own initialisation. What it
    leaves uncommitted is committed, so that Alembic still owns its transactions.

    The database comes from ``config.attributes["connection"]`` (a Connection, an Engine or any
    object with ``.connect()``), else ``-x url=...``, else ``sqlalchemy.url``.
    """
    from alembic import context

    env = getattr(context, "_proxy", None)
    if env is None:
        raise ConfigError("run_migrations() must be called from env.py, while Alembic runs it")
    config = context.config
    run: RunContext | None = config.attributes.get(RUN_KEY)
    try:
        if run is None:
            _configure_logging(config)
        settings = run.settings if run is not None else resolve_settings({}, config)
        common = _configure_options(settings, target_metadata, configure_kwargs)
        if context.is_offline_mode():
            options = {**_OFFLINE_DEFAULTS, **_split(common, offline=True), **(offline or {})}
            _check_reserved(options)
            context.configure(url=_offline_url(context, config), **options)
            with context.begin_transaction():
                context.run_migrations()
            return
        options = {**_split(common, offline=False), **(online or {})}
        _check_reserved(options)
        if run is not None:  # ensure_migrated/upgrade/downgrade: they hold the lock and fence
            _setup(run.connection, connection_setup)
            metadata = target_metadata if target_metadata is not None else run.target_metadata
            plan_bootstrap(run.connection, settings, metadata, run.tracker, run.tracker.destination)
            if options.get("target_metadata") is None:
                options["target_metadata"] = metadata
            context.configure(connection=run.connection, **options)
            with context.begin_transaction():
                context.run_migrations()
            return
        _run_from_alembic(context, env, config, settings, options, connection_setup)
    except AutolockError as exc:
        if run is not None:
            raise
        raise _as_command_error(exc) from exc.__cause__


def _run_from_alembic(
    context: Any,
    env: Any,
    config: Any,
    settings: Settings,
    options: dict[str, Any],
    setup: ConnectionSetup | None,
) -> None:
    """The plain ``alembic`` command (or ``alembic.command.*`` called from code)."""
    mutating = "destination_rev" in env.context_opts and not env.context_opts.get("dont_mutate")
    fn = env.context_opts.get("fn")
    if getattr(fn, "__module__", "") == "alembic.command" and fn.__name__ == "downgrade":
        gate_downgrade(settings)  # before any lock is taken or connection made
    with _connectable(context, config) as (engine, given):
        run_for_engine(
            engine,
            _run_with,
            context,
            env,
            engine,
            given,
            settings,
            options,
            setup,
            mutating,
        )


def _run_with(
    context: Any,
    env: Any,
    engine: Engine,
    given: Connection | None,
    settings: Settings,
    options: dict[str, Any],
    setup: ConnectionSetup | None,
    mutating: bool,
) -> None:
    """Check, lock, migrate (the plain command's path, once the engine can connect)."""
    if not mutating:  # current, check, history, autogenerate: read only, no lock
        with _connection(engine, given) as conn:
            _setup(conn, setup)
            context.configure(connection=conn, **options)
            with context.begin_transaction():
                context.run_migrations()
        return
    namespace = derive_namespace(settings, engine)
    from ._runner import make_lock

    lock, migration_engine = make_lock(engine, settings, namespace)
    if given is not None:
        migration_engine = engine
    destination = env.context_opts.get("destination_rev")
    script_heads = frozenset(env.script.get_heads())
    at_target: Callable[[tuple[str, ...]], bool] | None = None
    if destination in ("head", "heads"):

        def at_target(heads: tuple[str, ...]) -> bool:
            return frozenset(heads) == script_heads

    while True:
        if at_target is not None and _noop_if_settled(
            context, env, engine, given, settings, options, setup, at_target
        ):
            return
        watch = None
        if at_target is not None:

            def read(conn: Connection | None) -> tuple[str, ...] | None:
                return peek_heads(conn, engine, settings)

            watch = Watch(read=read, settled=at_target)
        acquired = lock.acquire(watch)
        if not acquired.held:
            continue
        # the second look, as ensure_migrated's: a waiter that got the lock just after the
        # holder finished has nothing to do, and does it without the lock
        if at_target is not None and at_target(
            heads_now(lock, engine, settings, mask_url(engine.url))
        ):
            lock.release()
            continue
        break
    try:
        _run_locked(context, env, lock, migration_engine, given, settings, options, setup)
    finally:
        lock.release()
        _state.heads.clear()  # this process's own cached "at head" answers are stale now


def _noop_if_settled(
    context: Any,
    env: Any,
    engine: Engine,
    given: Connection | None,
    settings: Settings,
    options: dict[str, Any],
    setup: ConnectionSetup | None,
    at_target: Callable[[tuple[str, ...]], bool],
) -> bool:
    """At the target already: let Alembic run its (empty) plan without any lock, the way
    ``alembic-autolock upgrade`` answers at head. False (nothing done) if the database is not
    there, or stopped being there before Alembic looked."""
    with _connection(engine, given) as conn:
        outside = not conn.in_transaction()
        if outside:
            heads = heads_on(conn, settings)
            conn.rollback()  # end the look's transaction: Alembic must find none open
        else:  # the caller's transaction: look without a statement that could fail in it
            heads = _heads_in_transaction(conn, settings)
        if not at_target(heads):
            return False
        steps_seen = False
        original = env.context_opts["fn"]

        def nothing_to_do(heads: Any, context: Any) -> list[Any]:
            nonlocal steps_seen
            steps_seen = bool(list(original(heads, context)))
            return []

        _setup(conn, setup)
        context.configure(connection=conn, fn=nothing_to_do, **options)
        with context.begin_transaction():
            context.run_migrations()
        return not steps_seen


def _run_locked(
    context: Any,
    env: Any,
    lock: MigrationLock,
    migration_engine: Engine,
    given: Connection | None,
    settings: Settings,
    options: dict[str, Any],
    setup: ConnectionSetup | None,
) -> None:
    """Holding the lock: the migration connection, its fence, the journal, then Alembic (run
    again while a revision fails only on ddl_lock_timeout, up to ddl_retries times)."""
    masked = mask_url(migration_engine.url)
    destination = env.context_opts.get("destination_rev")
    retries = DDLRetries(settings, relative=relative_destination(destination))
    with _migration_connection(migration_engine, given) as conn:
        if given is None and autocommit(conn):  # migrations run in transactions
            conn.execution_options(isolation_level=conn.default_isolation_level)
        with migration_session(
            lock,
            conn,
            engine=migration_engine,
            settings=settings,
            script=env.script,
            owned=given is None,
        ) as journal:
            _setup(conn, setup)
            while True:
                tracker = Tracker(settings=settings, lock=lock, journal=journal)
                plan_bootstrap(conn, settings, options.get("target_metadata"), tracker, destination)
                context.configure(
                    connection=conn, fn=tracker.wrap(env.context_opts["fn"]), **options
                )
                try:
                    with context.begin_transaction():
                        context.run_migrations()
                    record_durations(journal, tracker)
                    return
                except LockLost as exc:
                    rollback_quietly(conn)
                    raise truthful_lost(
                        exc, tracker, migration_engine, settings, env.script, masked
                    ) from exc
                except AutolockError:
                    raise
                except Exception as exc:
                    rollback_quietly(conn)
                    error = failure(exc, tracker, migration_engine, settings, env.script, masked)
                    if isinstance(error, MigrationFailed):
                        if retries.again(error):
                            continue
                        error = retries.final(error)
                    raise error from exc


def _heads_in_transaction(conn: Connection, settings: Settings) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(
        connection=conn,
        opts={
            "version_table": settings.version_table,
            "version_table_schema": settings.version_table_schema,
        },
    )
    return tuple(sorted(ctx.get_current_heads()))


def _setup(conn: Connection, setup: ConnectionSetup | None) -> None:
    if setup is None:
        return
    outside = not conn.in_transaction()
    setup(conn)
    if outside and conn.in_transaction():  # Alembic must find no transaction open
        conn.commit()


def _split(options: dict[str, Any], *, offline: bool) -> dict[str, Any]:
    """Every option for --sql; for an online run, all but the offline-only ones."""
    if offline:
        return dict(options)
    return {k: v for k, v in options.items() if k not in OFFLINE_ONLY}


def _check_reserved(options: dict[str, Any]) -> None:
    for key, why in _RESERVED.items():
        if key in options:
            raise ConfigError(
                f"run_migrations() does not take {key!r}: {why}",
                key=key,
                source="run_migrations() argument",
            )


def _configure_options(
    settings: Settings, target_metadata: Any, kwargs: dict[str, Any]
) -> dict[str, Any]:
    _check_reserved(kwargs)
    for key in ("version_table", "version_table_schema"):
        if key in kwargs and kwargs[key] != getattr(settings, key):
            raise ConfigError(
                f"run_migrations({key}={kwargs[key]!r}) differs from the {key} setting "
                f"({getattr(settings, key)!r}, from {settings.source(key)}): set {key} in "
                "[alembic_autolock] in alembic.ini instead, so that the check before the lock "
                "reads the same table the migration writes",
                key=key,
                value=kwargs[key],
                source="run_migrations() argument",
            )
    options = dict(kwargs)
    per_migration = settings.transaction == "per-migration"
    if "transaction_per_migration" in options:
        wanted = bool(options["transaction_per_migration"])
        if settings.source("transaction") != "default" and wanted != per_migration:
            raise ConfigError(
                f"run_migrations(transaction_per_migration={wanted}) contradicts the transaction "
                f"setting ({settings.transaction!r}, from {settings.source('transaction')}): "
                "keep one of them",
                key="transaction",
                value=settings.transaction,
                source=settings.source("transaction"),
            )
    else:
        options["transaction_per_migration"] = per_migration
    options["version_table"] = settings.version_table
    options["version_table_schema"] = settings.version_table_schema
    options["target_metadata"] = target_metadata
    options["include_name"] = _without_journal(options.get("include_name"), settings)
    return options


def _without_journal(include_name: Any, settings: Settings) -> Callable[..., bool]:
    """``include_name`` for autogenerate that also leaves out the library's own tables (the
    journal beside the version table, and on MySQL/MariaDB the lock holders' table), as Alembic
    leaves out its version table (else ``alembic revision --autogenerate`` proposes dropping
    them). The project's own ``include_name``, if any, decides everything else."""
    from ._journal import TABLE
    from .locks.mysql import HOLDERS_TABLE

    schema = settings.version_table_schema

    def include(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ == "table":
            where = parent_names.get("schema_name")
            if (name == TABLE and where == schema) or (name == HOLDERS_TABLE and where is None):
                return False
        return True if include_name is None else bool(include_name(name, type_, parent_names))

    return include


def _configure_logging(config: Any) -> None:
    """What Alembic's stock env.py does (``fileConfig``), only when the ``alembic`` command
    runs: called from code (``alembic.command.upgrade(cfg)`` in an application), the
    application's logging stays as it is. Existing loggers are kept enabled either way."""
    if config.config_file_name is None or not config.attributes.get("configure_logger", True):
        return
    if config.cmd_opts is None:  # not the command line: an application called alembic.command
        return
    if config.file_config.has_section("loggers"):
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url(context: Any, config: Any) -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or main_option(
        config, "sqlalchemy.url"
    )
    if not url:
        where = config.config_file_name or "the Alembic configuration"
        raise ConfigError(
            f"no database URL: set sqlalchemy.url in {where}, pass -x url=..., or hand a "
            "connection to env.py through config.attributes['connection']"
        )
    parse_url(str(url), "the database URL")  # a malformed one: a ConfigError, masked
    return str(url)


def _offline_url(context: Any, config: Any) -> Any:
    """The URL that ``--sql`` renders for: that of the connection or engine handed over in
    ``config.attributes["connection"]`` (as online runs use it; Flask-Migrate's alembic.ini has
    no sqlalchemy.url), else ``-x url=...``, else sqlalchemy.url. Nothing connects."""
    connectable = config.attributes.get("connection")
    if isinstance(connectable, Connection | Engine):
        return connectable.engine.url
    engine = getattr(connectable, "engine", None)  # an engine-like object that names its engine
    if isinstance(engine, Engine):
        return engine.url
    return _url(context, config)


@contextmanager
def _connectable(context: Any, config: Any) -> Iterator[tuple[Engine, Connection | None]]:
    """The engine to lock and migrate with, and the caller's connection if it handed one over
    (an engine-like object's connection counts as handed over: it is opened once, here)."""
    connectable = config.attributes.get("connection")
    if isinstance(connectable, Connection):
        yield connectable.engine, connectable
        return
    if type(connectable).__name__ == "AsyncEngine":
        connectable = connectable.sync_engine
    if isinstance(connectable, Engine):
        yield connectable, None
        return
    if connectable is not None:  # pytest-alembic's WrappingConnection and the like
        with connectable.connect() as conn:
            yield conn.engine, conn
        return
    section = ini_section(config, config.config_ini_section)
    section.pop("here", None)
    section["sqlalchemy.url"] = _url(context, config)
    owned = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    try:
        yield owned, None
    finally:
        owned.dispose()


@contextmanager
def _connection(engine: Engine, given: Connection | None) -> Iterator[Connection]:
    if given is not None:
        yield given
        return
    try:
        conn = open_connection(engine)
    except DBAPIError as exc:
        raise unavailable(engine, exc) from exc
    with conn:
        yield conn


@contextmanager
def _migration_connection(engine: Engine, given: Connection | None) -> Iterator[Connection]:
    """The connection to migrate on: the caller's, or a fresh one of ``engine`` that is closed
    afterwards and never given back to a pool. The library names that session and holds the
    fence on it, and ``connection_setup`` may have changed its settings: none of that may
    reach the application's next checkout when the engine is the application's own (handed
    over in ``config.attributes["connection"]``)."""
    if given is not None:
        yield given
        return
    try:
        conn = open_connection(engine)
    except DBAPIError as exc:
        raise unavailable(engine, exc) from exc
    try:
        yield conn
    finally:
        if engine.dialect.name == "sqlite":
            conn.close()  # an in-memory database lives as long as its one connection
        else:
            close(conn)


_COMMAND_ERRORS: dict[type[BaseException], type[BaseException]] = {}


def _as_command_error(exc: AutolockError) -> BaseException:
    """``exc`` as an instance of a class that is both its own class and Alembic's CommandError,
    so that the ``alembic`` command prints it as one ``FAILED:`` line (and code that catches
    either still catches it)."""
    from alembic.util import CommandError

    if isinstance(exc, CommandError):
        return exc
    cls = _COMMAND_ERRORS.get(type(exc))
    if cls is None:
        cls = type(
            type(exc).__name__, (type(exc), CommandError), {"__module__": type(exc).__module__}
        )
        _COMMAND_ERRORS[type(exc)] = cls
    twin = cls.__new__(cls)
    twin.args = exc.args
    twin.__dict__.update(exc.__dict__)
    twin.__traceback__ = exc.__traceback__
    return twin
