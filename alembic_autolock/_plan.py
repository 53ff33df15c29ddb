"""Preparing a run: configuration, settings, scripts, identity. Everything here is computed once
per (engine, arguments) and reused until the cache TTL runs out."""

from __future__ import annotations

import configparser
import copy
import logging
import sys
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy import column, select, table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import _state
from ._config import ConfigLike, ini_error, load_config, script_location
from ._mask import mask_text, mask_url
from ._settings import Settings, resolve_settings
from .exceptions import ConfigError, DatabaseUnavailable
from .locks._session import connect_retrying, first_line
from .locks.file import sqlite_path


@dataclass(frozen=True)
class Plan:
    settings: Settings
    cfg: Config
    script: ScriptDirectory
    script_heads: frozenset[str]
    # the engine (one token per Engine object, so two engines on one URL never share an
    # answer: another search_path, schema_translate_map or tenant is another engine), the
    # scripts and the version table
    cache_key: tuple[int, str, str | None, str]
    namespace: str
    masked_url: str
    engine_ref: weakref.ReferenceType[Engine]
    # an in-memory SQLite database: one connection that threads take turns on, so even the
    # first look happens under the (process-local) lock
    process_local: bool = False


def derive_namespace(settings: Settings, engine: Engine) -> str:
    """The lock identity: the database, the version table's schema and the version table.

    The host is left out on purpose: two replicas that reach one server under two names must
    still exclude each other (a collision between two servers only serialises them).
    """
    if settings.namespace is not None:
        return settings.namespace
    url = engine.url
    database = url.database or url.username or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:"):
        database = sqlite_path(url) or database
    return (
        f"alembic_autolock:{database}:{settings.version_table_schema or ''}:"
        f"{settings.version_table}"
    )


def load_scripts(cfg: Config) -> tuple[ScriptDirectory, frozenset[str]]:
    """The ScriptDirectory and its heads, with Alembic's errors turned into ConfigError.

    ``prepend_sys_path`` makes every ``ScriptDirectory.from_config`` prepend to ``sys.path``
    again; entries it adds that were already there are removed.
    """
    location = script_location(cfg)
    before = list(sys.path)
    try:
        script = ScriptDirectory.from_config(cfg)
        heads = frozenset(script.get_heads())
    except CommandError as exc:
        raise ConfigError(f"cannot load the migration scripts at {location}: {exc}") from exc
    except configparser.InterpolationError as exc:  # its text quotes the value
        raise ini_error(cfg, exc) from None
    except Exception as exc:  # a revision file that does not import
        raise ConfigError(
            f"cannot load the migration scripts at {location}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        added = len(sys.path) - len(before)
        if added > 0 and sys.path[added:] == before:
            fresh = [p for p in sys.path[:added] if p not in before]
            sys.path[:] = fresh + before
    return script, heads


def check_engine(engine: object) -> None:
    """A ConfigError for anything but an Engine, saying what to call instead."""
    if isinstance(engine, Engine):
        return
    hint = (
        "for an AsyncEngine use the _async twin (await ensure_migrated_async(engine))"
        if type(engine).__name__ == "AsyncEngine"
        else "pass the result of sqlalchemy.create_engine(...)"
    )
    raise ConfigError(f"expected an SQLAlchemy Engine, got {type(engine).__name__}: {hint}")


def prepare(engine: Engine, config: ConfigLike, overrides: Mapping[str, Any]) -> Plan:
    check_engine(engine)
    from os import environ

    cfg = load_config(config, environ=environ)
    settings = resolve_settings(overrides, cfg)
    check_identifiers(settings, engine)
    script, heads = load_scripts(cfg)
    masked = mask_url(engine.url)
    return Plan(
        settings=settings,
        cfg=cfg,
        script=script,
        script_heads=heads,
        cache_key=(
            _state.engine_token(engine),
            script.dir,
            settings.version_table_schema,
            settings.version_table,
        ),
        namespace=derive_namespace(settings, engine),
        masked_url=masked,
        engine_ref=weakref.ref(engine),
        process_local=engine.dialect.name == "sqlite" and sqlite_path(engine.url) is None,
    )


_NAME_LIMITS = {"mysql": 64, "mariadb": 64}


def check_identifiers(settings: Settings, engine: Engine) -> None:
    """Names the database cannot hold are refused before anything runs (SQLAlchemy's MySQL
    dialect reports its 255-character label limit; a MySQL table name holds 64)."""
    limit = _NAME_LIMITS.get(engine.dialect.name, engine.dialect.max_identifier_length)
    for key in ("version_table", "version_table_schema"):
        name = getattr(settings, key)
        if name is not None and len(name) > limit:
            raise ConfigError(
                f"{key} {name[:20]!r}... is {len(name)} characters long; {engine.dialect.name} "
                f"names hold at most {limit}: choose a shorter one",
                key=key,
                value=name,
                source=settings.source(key),
            )


@contextmanager
def connect(
    engine: Engine, masked_url: str | None = None, *, deadline: float | None = None
) -> Iterator[Connection]:
    """engine.connect(), with a failure to connect turned into DatabaseUnavailable.

    With ``deadline`` (a ``time.monotonic()``), a server that is full ("too many clients", as
    when a fleet starts at once) is retried with jittered backoff until then."""
    conn = open_connection(engine, masked_url, deadline=deadline)
    with conn:
        yield conn


def open_connection(
    engine: Engine, masked_url: str | None = None, *, deadline: float | None = None
) -> Connection:
    """engine.connect(); a full server is retried until ``deadline``; DatabaseUnavailable."""
    try:
        return connect_retrying(engine, deadline)
    except DBAPIError as exc:
        raise unavailable(engine, exc, masked_url) from exc


def unavailable(
    engine: Engine,
    exc: DBAPIError,
    masked_url: str | None = None,
    *,
    while_doing: str | None = None,
) -> DatabaseUnavailable:
    masked = masked_url or mask_url(engine.url)
    detail = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
    detail = mask_text(detail, engine.url)  # a driver may quote the password back
    doing = f" while {while_doing}" if while_doing else ""
    return DatabaseUnavailable(
        f"cannot connect to {masked}{doing}: {detail}. Nothing was applied. Check that the "
        "server is running and that the URL, user and password are right.",
        url=masked,
    )


def read_heads(
    engine: Engine,
    settings: Settings,
    masked_url: str | None = None,
    *,
    deadline: float | None = None,
) -> tuple[str, ...]:
    """The database's current heads, read on a fresh connection that is then closed."""
    with connect(engine, masked_url, deadline=deadline) as conn:
        return heads_on(conn, settings)


def _versions(settings: Settings) -> Any:
    return table(
        settings.version_table, column("version_num"), schema=settings.version_table_schema
    )


def heads_on(conn: Connection, settings: Settings) -> tuple[str, ...]:
    """The heads, read on ``conn``: one plain SELECT of the version table (quoted by
    SQLAlchemy). If it fails because the table does not exist yet, there are none; only on
    another failure does Alembic's MigrationContext look (its has_table reflection costs
    ~10 ms on a new connection, the SELECT well under one)."""
    versions = _versions(settings)
    try:
        return tuple(sorted(conn.execute(select(versions.c.version_num)).scalars()))
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise unavailable(conn.engine, exc, while_doing="reading the version table") from exc
        conn.rollback()
        if missing_table(exc):
            return ()
    try:
        ctx = MigrationContext.configure(
            connection=conn,
            opts={
                "version_table": settings.version_table,
                "version_table_schema": settings.version_table_schema,
            },
        )
        return tuple(sorted(ctx.get_current_heads()))
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise unavailable(conn.engine, exc, while_doing="reading the version table") from exc
        where = ".".join(filter(None, [settings.version_table_schema, settings.version_table]))
        raise ConfigError(
            f"cannot read the version table {where} of {mask_url(conn.engine.url)}: "
            f"{mask_text(first_line(exc), conn.engine.url)}. Check that the user may read it "
            "and that version_table / version_table_schema name it.",
            key="version_table",
            value=settings.version_table,
            source=settings.source("version_table"),
        ) from exc


def missing_table(exc: DBAPIError) -> bool:
    """Whether a statement failed because its table (or schema) does not exist."""
    orig = exc.orig
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    if code is not None:
        return code in ("42P01", "3F000")  # undefined_table, invalid_schema_name
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # MySQL: no such table, unknown database
        return args[0] in (1146, 1049)
    return "no such table" in str(orig)  # SQLite


def peek_heads(
    conn: Connection | None, engine: Engine, settings: Settings
) -> tuple[str, ...] | None:
    """The heads for a waiter's look: on ``conn`` (an AUTOCOMMIT connection to the database)
    or on a short connection of ``engine``; None when they cannot be read right now (no version
    table yet, the server restarting): the waiter just keeps waiting."""
    versions = _versions(settings)
    try:
        if conn is not None:
            return tuple(sorted(conn.execute(select(versions.c.version_num)).scalars()))
        with engine.connect() as own:
            return tuple(sorted(own.execute(select(versions.c.version_num)).scalars()))
    except DBAPIError:
        return None


def unknown_heads(script: ScriptDirectory, heads: tuple[str, ...]) -> list[str]:
    """The heads that these scripts do not contain (the database is ahead of the code)."""
    missing = []
    for head in heads:
        try:
            script.revision_map.get_revision(head)
        except (ResolutionError, CommandError):
            missing.append(head)
    return missing


def pending_steps(script: ScriptDirectory, heads: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(revision, message) of what ``upgrade heads`` would apply, in order."""
    steps = script._upgrade_revs("heads", heads)  # type: ignore[arg-type]  # as command.upgrade
    return [(step.revision.revision, step.revision.doc) for step in steps]


def ancestors(script: ScriptDirectory, heads: tuple[str, ...]) -> set[str]:
    """Every revision applied when the database is at ``heads``."""
    if not heads:
        return set()
    return {rev.revision for rev in script.iterate_revisions(heads, "base") if rev is not None}


def clone_config(cfg: Config) -> Config:
    """A shallow copy of ``cfg`` with its own ``attributes``, so a run never changes the caller's
    Config and two runs never share a connection through it."""
    clone = copy.copy(cfg)
    vars(clone)["attributes"] = dict(cfg.attributes)
    clone.attributes.setdefault("configure_logger", False)
    return clone


@contextmanager
def keep_loggers_enabled() -> Iterator[None]:
    """Undo what a stock env.py's ``fileConfig()`` does to the application's loggers.

    ``logging.config.fileConfig`` disables every logger that exists when it runs; an app that
    calls ensure_migrated would otherwise lose its own logging.
    """
    manager = logging.Logger.manager
    enabled = [
        lg
        for lg in list(manager.loggerDict.values())
        if isinstance(lg, logging.Logger) and not lg.disabled
    ]
    try:
        yield
    finally:
        for lg in enabled:
            lg.disabled = False
