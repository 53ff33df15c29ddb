"""The whole body of an env.py.

An existing project adopts alembic_autolock by replacing the body of its env.py with::

    from alembic_autolock.env import run_migrations
    from myapp.models import Base

    run_migrations(target_metadata=Base.metadata)

Then ``alembic upgrade head`` takes the same lock as ``ensure_migrated``; ``alembic upgrade
head --sql`` still works offline; and when ensure_migrated/upgrade/downgrade run env.py, it uses
their connection and their lock.
"""

from __future__ import annotations

import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import _sessions as sessions
from . import _state
from ._config import ini_section, main_option
from ._events import mask_url
from ._mask import parse_url
from ._plan import derive_namespace, unavailable
from ._run import RUN_KEY, RunContext, Tracker, failure
from ._settings import Settings, resolve_settings
from .exceptions import AutolockError, ConfigError
from .locks import MigrationLock, make_backend

__all__ = ["run_migrations"]

_RESERVED = ("connection", "url", "fn")


def run_migrations(target_metadata: Any = None, **configure_kwargs: Any) -> None:
    """Configure Alembic and run the migrations of the current command, under the lock.

    ``configure_kwargs`` go to ``context.configure()`` (``include_schemas``,
    ``render_as_batch``, ``compare_type`` ...). ``version_table`` and ``version_table_schema``
    belong in the ``[alembic_autolock]`` settings so that the check reads the table the upgrade
    writes; passing a different value here is an error.

    The database comes from ``config.attributes["connection"]`` (a Connection, an Engine or any
    object with ``.connect()``), else ``-x url=...``, else ``sqlalchemy.url``.
    """
    from alembic import context

    env = getattr(context, "_proxy", None)
    if env is None:
        raise ConfigError("run_migrations() must be called from env.py, while Alembic runs it")
    config = context.config
    run: RunContext | None = config.attributes.get(RUN_KEY)
    if run is None:
        _configure_logging(config)
    settings = run.settings if run is not None else resolve_settings({}, config)
    options = _configure_options(settings, target_metadata, configure_kwargs)

    if context.is_offline_mode():
        context.configure(
            url=_url(context, config),
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
            **options,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    if run is not None:  # ensure_migrated/upgrade/downgrade: they hold the lock
        context.configure(connection=run.connection, **options)
        with context.begin_transaction():
            context.run_migrations()
        return

    mutating = "destination_rev" in env.context_opts and not env.context_opts.get("dont_mutate")
    with _connection(context, config) as (conn, origin):
        if not mutating:  # current, check, history, autogenerate: read only, no lock
            context.configure(connection=conn, **options)
            with context.begin_transaction():
                context.run_migrations()
            return
        _run_locked(context, env, conn, origin, settings, options)


def _run_locked(
    context: Any,
    env: Any,
    conn: Connection,
    origin: str,
    settings: Settings,
    options: dict[str, Any],
) -> None:
    engine = conn.engine
    namespace = derive_namespace(settings, engine)
    lock = MigrationLock(make_backend(settings, engine, namespace), namespace, settings.timeout)
    tracker = Tracker(settings=settings, lock=lock)
    lock.acquire()
    try:
        if lock.excludes_others:
            sessions.reap_orphans(engine, namespace, settings.orphan_wait)
        if origin != "given":  # never change a Connection the caller handed over
            # our own NullPool session may also get session settings; a pooled one may not
            sessions.tag(conn, namespace, session_settings=origin == "owned")
        # The lock is on its own connection: ``conn`` has executed nothing yet, so Alembic owns
        # its transactions (per revision by default).
        context.configure(connection=conn, fn=tracker.wrap(env.context_opts["fn"]), **options)
        try:
            with context.begin_transaction():
                context.run_migrations()
        except AutolockError:
            raise
        except Exception as exc:
            if conn.in_transaction():
                conn.rollback()
            raise failure(exc, tracker, engine, settings, env.script, mask_url(engine.url)) from exc
    finally:
        lock.release()
        _state.heads.clear()  # this process's own cached "at head" answers are stale now


def _configure_options(
    settings: Settings, target_metadata: Any, kwargs: dict[str, Any]
) -> dict[str, Any]:
    for key in _RESERVED:
        if key in kwargs:
            raise ConfigError(
                f"run_migrations() does not take {key!r}: the connection comes from "
                "config.attributes['connection'], -x url=..., or sqlalchemy.url"
            )
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
    options.setdefault("transaction_per_migration", settings.transaction == "per-migration")
    options["version_table"] = settings.version_table
    options["version_table_schema"] = settings.version_table_schema
    options["target_metadata"] = target_metadata
    return options


def _configure_logging(config: Any) -> None:
    """Alembic's stock env.py calls fileConfig(), which disables every existing logger; this
    keeps them, and skips logging setup entirely when the caller says so."""
    if config.config_file_name is None or not config.attributes.get("configure_logger", True):
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


@contextmanager
def _connection(context: Any, config: Any) -> Iterator[tuple[Connection, str]]:
    """The connection to migrate on, and where it comes from: "given" (a Connection from the
    caller), "opened" (from the caller's Engine or engine-like object) or "owned" (from a NullPool
    engine made from the URL, disposed afterwards)."""
    connectable = config.attributes.get("connection")
    if isinstance(connectable, Connection):
        yield connectable, "given"
        return
    owned: Engine | None = None
    if connectable is None:
        section = ini_section(config, config.config_ini_section)
        section.pop("here", None)
        section["sqlalchemy.url"] = _url(context, config)
        connectable = owned = engine_from_config(
            section, prefix="sqlalchemy.", poolclass=pool.NullPool
        )
    try:
        try:
            conn = connectable.connect()
        except DBAPIError as exc:
            if isinstance(connectable, Engine):
                raise unavailable(connectable, exc) from exc
            raise
        with conn:
            yield conn, "owned" if owned is not None else "opened"
    finally:
        if owned is not None:
            owned.dispose()
