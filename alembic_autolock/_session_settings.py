"""What the migration session is told before Alembic configures it: the tenant schema first on
the search path, and how long its statements may wait for a table lock.

Both are session settings, committed at once so that Alembic's transactions (and a rollback of
one) keep them. On a connection the library opened, they end with the session; on one handed
over by the caller, the previous values are put back afterwards.

A statement that waits for a lock on a busy table holds its place in the lock queue, and every
query on that table queues behind it: an ``ALTER TABLE`` that waits for a long report blocks
the application's short reads for as long. ``ddl_lock_timeout`` makes it give up instead
(PostgreSQL ``lock_timeout``; MySQL and MariaDB ``lock_wait_timeout`` for metadata locks and
``innodb_lock_wait_timeout`` for rows), and :func:`lock_timed_out` recognises that failure so
the runner can try the revision again later.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import Connection

from .exceptions import ConfigError

if TYPE_CHECKING:
    from ._settings import Settings

_PG_SET = text("SELECT set_config(:name, :value, false)")
_PG_GET = text("SELECT current_setting(:name)")
_PG_SCHEMA_EXISTS = text("SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname = :schema")
_PG_SET_LOCAL = text("SELECT set_config(:name, :value, true)")
# the tenant's schema (quoted by the server) first, then what the session had
_PG_SEARCH_PATH = text("SELECT quote_ident(:schema) || ', ' || current_setting('search_path')")
_MYSQL_VARIABLES = ("lock_wait_timeout", "innodb_lock_wait_timeout")


def schema_missing(schema: str) -> ConfigError:
    return ConfigError(
        f"schema {schema!r} does not exist in this database (nothing was applied): create it "
        "first (CREATE SCHEMA), or check the tenant's name",
        key="schema",
        value=schema,
    )


def check_schema_dialect(settings: Settings, dialect: str) -> None:
    if settings.schema is not None and dialect != "postgresql":
        raise ConfigError(
            f"schema = {settings.schema!r} is for PostgreSQL schemas; on {dialect} a schema is "
            "a database: give each tenant's database its own URL instead",
            key="schema",
            value=settings.schema,
            source=settings.source("schema"),
        )


def schema_exists(conn: Connection, schema: str) -> bool:
    return bool(conn.execute(_PG_SCHEMA_EXISTS, {"schema": schema}).scalar())


@contextmanager
def migration_settings(conn: Connection, settings: Settings, *, owned: bool) -> Iterator[None]:
    """Apply the schema and ``ddl_lock_timeout`` to the migration session ``conn`` for the
    block. On a connection the caller handed over (``owned`` False), what they replaced is
    put back afterwards; if it came inside the caller's transaction, PostgreSQL's settings are
    made local to that transaction and nothing is committed here."""
    dialect = conn.dialect.name
    check_schema_dialect(settings, dialect)
    callers_transaction = not owned and conn.in_transaction()
    restore: list[tuple[str, str]] = []
    if dialect == "postgresql":
        local = callers_transaction  # set_config(..., true): ends with the transaction

        def set_pg(name: str, value: str) -> None:
            if not local:
                restore.append((name, conn.execute(_PG_GET, {"name": name}).one()[0]))
            conn.execute(_PG_SET_LOCAL if local else _PG_SET, {"name": name, "value": value})

        if settings.schema is not None:
            if not schema_exists(conn, settings.schema):
                _end(conn, callers_transaction)
                raise schema_missing(settings.schema)
            path = conn.execute(_PG_SEARCH_PATH, {"schema": settings.schema}).one()[0]
            set_pg("search_path", path)
        if settings.ddl_lock_timeout > 0:
            milliseconds = max(1, math.ceil(settings.ddl_lock_timeout * 1000))
            set_pg("lock_timeout", f"{milliseconds}ms")
    elif dialect in ("mysql", "mariadb") and settings.ddl_lock_timeout > 0:
        seconds = max(1, math.ceil(settings.ddl_lock_timeout))
        for name in _MYSQL_VARIABLES:
            restore.append((name, str(_mysql_get(conn, name))))
            _mysql_set(conn, name, seconds)
    _end(conn, callers_transaction)
    try:
        yield
    finally:
        if restore and not owned and not conn.invalidated:
            opened = not conn.in_transaction()
            for name, value in reversed(restore):
                if dialect == "postgresql":
                    conn.execute(_PG_SET, {"name": name, "value": value})
                else:
                    _mysql_set(conn, name, int(value))
            if opened:
                conn.commit()


# The variable names below are constants of this module, never a user's string.
_MYSQL_GET = {name: text(f"SELECT @@SESSION.{name}") for name in _MYSQL_VARIABLES}
_MYSQL_SET = {name: text(f"SET SESSION {name} = :value") for name in _MYSQL_VARIABLES}


def _mysql_get(conn: Connection, name: str) -> int:
    return int(conn.execute(_MYSQL_GET[name]).scalar() or 0)


def _mysql_set(conn: Connection, name: str, value: int) -> None:
    conn.execute(_MYSQL_SET[name], {"value": value})


def _end(conn: Connection, callers_transaction: bool) -> None:
    """Commit what the settings' statements began, so that Alembic finds no transaction open
    (and a later rollback cannot undo them); never the caller's own transaction."""
    if not callers_transaction and conn.in_transaction():
        conn.commit()


def lock_timed_out(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) is a statement that gave up waiting for a
    lock: PostgreSQL ``lock_not_available`` (55P03), MySQL/MariaDB error 1205."""
    seen = 0
    while exc is not None and seen < 8:
        orig = getattr(exc, "orig", None)
        if orig is not None:
            code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
            if code == "55P03":
                return True
            args = getattr(orig, "args", ())
            if args and args[0] == 1205:
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
