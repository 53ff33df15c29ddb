"""The database, as the library talks to it outside a migration: connecting (a full server is
retried), reading the version table, and turning driver errors into library errors.

Light on purpose: the at-head check of a fresh process (``_cold.py``) runs on this module
alone, with no Alembic import.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import column, select, table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ._mask import mask_text, mask_url
from ._wait import Backoff
from .exceptions import ConfigError, DatabaseUnavailable

if TYPE_CHECKING:
    from ._settings import Settings


# How long the library's own short connections retry a server that is full.
SERVER_FULL_WAIT = 10.0


def server_full(exc: DBAPIError) -> bool:
    """ "too many clients" (PostgreSQL) or "Too many connections" (MySQL, 1040): a fleet
    starting at once; the server has room again a moment later."""
    text = str(exc.orig).lower()
    code = getattr(exc.orig, "args", (None,))[:1]
    return "too many clients" in text or "too many connections" in text or code == (1040,)


def connect_retrying(engine: Engine, deadline: float | None) -> Connection:
    """engine.connect(), retrying a full server with jittered backoff until ``deadline`` (a
    ``time.monotonic()``; None: no retry). Other errors are raised at once."""
    backoff = Backoff(0 if deadline is None else max(0.0, deadline - time.monotonic()), 0.05, 1.0)
    while True:
        try:
            return engine.connect()
        except DBAPIError as exc:
            if not (server_full(exc) and backoff.sleep()):
                raise


# --- connection errors that a waiter outlasts ----------------------------------------------

_TRANSIENT_TEXT = (
    "too many clients",
    "too many connections",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "connection refused",
    "could not connect",
    "can't connect",
    "server closed the connection",
    "terminating connection",
    "connection reset",
    "lost connection",
    "server has gone away",
    "broken pipe",
    "connection timed out",
    "timeout expired",
    "server shutdown",
)
_MYSQL_TRANSIENT = {1040, 1053, 1203, 2002, 2003, 2006, 2013, 2055}


def first_line(exc: BaseException) -> str:
    """The first line of a database error's own message (the driver's, not SQLAlchemy's)."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def transient(exc: BaseException) -> bool:
    """Whether a database error is one a waiter outlasts (the server restarting or full, the
    network dropping) rather than a mistake (wrong password, unknown database)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_TRANSIENT:
        return True
    message = str(orig).lower()
    return any(fragment in message for fragment in _TRANSIENT_TEXT)


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
    from alembic.runtime.migration import MigrationContext  # only off the fast path

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
