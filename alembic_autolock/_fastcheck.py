"""The readiness probe's fast answer: ``alembic-autolock check`` at head without SQLAlchemy or
Alembic.

A probe runs every few seconds on every pod, so its cost is its start-up. Importing SQLAlchemy
alone costs more than starting Python; Alembic and the revision files more again. When the
history's heads are known from the manifest (``_manifest.py``: written by any full load, checked
against the version files' names, sizes and modification times), the answer "at head" needs only
the database's heads: one SELECT of the version table over the DBAPI driver itself.

Only that answer is given here. Anything else (no manifest, a URL or driver this module does not
read exactly as SQLAlchemy would, a missing version table, a connection that fails, a database
that is not at head) returns None, and the command takes the full path, which says what is wrong
with the words and exit code it always used. So the fast path can be wrong only by being slow.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from ._mask import _SQLALCHEMY_URL

# Where the command line takes the database URL from, after --url and -x url=...
URL_VARIABLES = ("ALEMBIC_AUTOLOCK_URL", "DATABASE_URL")

# What the version table's name and schema may be for the fast path to quote them itself
# (quoted always; a name outside this pattern goes the full path, where SQLAlchemy quotes it).
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The fast path gives up after this long connecting; the full path then tries with its own
# retries and deadline (and says why it cannot connect).
CONNECT_TIMEOUT_S = 5


def environment_url() -> tuple[str, str] | None:
    """The URL from the environment and the variable it came from (``postgres://``, as Heroku
    and others set it, read as SQLAlchemy's ``postgresql://``)."""
    for name in URL_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            if value.startswith("postgres://"):
                value = "postgresql://" + value[len("postgres://") :]
            return value, f"${name}"
    return None


def at_head(config: str | None, url: str | None) -> list[str] | None:
    """The database's heads when it is at the history's heads as the manifest knows them; None
    when that cannot be said here (see the module docstring). ``url``: --url or -x url=...,
    else the environment, else ``sqlalchemy.url``."""
    try:
        from ._config import light_config, main_option
        from ._manifest import lookup
        from ._settings import resolve_settings

        cfg = light_config(config, environ=os.environ)
        if cfg is None:
            return None
        settings = resolve_settings({}, cfg)
        found = lookup(cfg, settings.cache_dir)
        if found is None:
            return None
        if not url:
            from_environment = environment_url()
            url = from_environment[0] if from_environment else main_option(cfg, "sqlalchemy.url")
        if not url:
            return None
        heads = database_heads(url, settings.version_table, settings.version_table_schema)
    except Exception:  # whatever it is, the full path meets it again and says what it is
        return None
    if heads is None or heads != found[1]:
        return None
    return sorted(heads)


def at_head_document(current: list[str]) -> dict[str, Any]:
    """``check --json`` at head, as the full path writes it."""
    return {
        "at_head": True,
        "ahead": False,
        "current_heads": current,
        "script_heads": current,
        "unknown_heads": [],
        "pending": [],
        "exit_code": 0,
    }


def database_heads(url: str, version_table: str, version_schema: str | None) -> set[str] | None:
    """The heads in the version table of the database at ``url`` (an SQLAlchemy URL), or None
    when this module cannot read them exactly as SQLAlchemy would."""
    if not _IDENTIFIER.match(version_table) or (
        version_schema is not None and not _IDENTIFIER.match(version_schema)
    ):
        return None
    match = re.fullmatch(_SQLALCHEMY_URL, url)
    if match is None:
        return None
    parts = match.groupdict()
    dialect, _, driver = parts["name"].lower().partition("+")
    try:
        query = _query(parts["query"])
    except ValueError:
        return None
    if dialect == "postgresql":
        connect = _postgresql(parts, query, driver)
        quote_char = '"'
    elif dialect in ("mysql", "mariadb"):
        connect = _mysql(parts, query, driver)
        quote_char = "`"
    elif dialect == "sqlite":
        connect = _sqlite(parts, query, driver)
        quote_char = '"'
    else:
        return None
    if connect is None:
        return None
    name = f"{quote_char}{version_table}{quote_char}"
    if version_schema is not None:
        name = f"{quote_char}{version_schema}{quote_char}.{name}"
    try:
        conn = connect()
    except Exception:
        return None
    try:
        cursor = conn.cursor()
        # both names matched _IDENTIFIER above and are quoted: no user text reaches the SQL
        cursor.execute(f"SELECT version_num FROM {name}")  # noqa: S608
        return {str(row[0]) for row in cursor.fetchall()}
    except Exception:  # no version table yet, no rights, ...: the full path says which
        return None
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _query(text: str | None) -> dict[str, str]:
    """The URL's query as SQLAlchemy reads it (``parse_qsl``); a key given twice (a list, which
    the drivers take only through SQLAlchemy's own handling) raises ValueError."""
    found: dict[str, str] = {}
    for key, value in parse_qsl(text or ""):
        if key in found:
            raise ValueError(key)
        found[key] = value
    return found


def _credentials(parts: dict[str, Any], database_key: str) -> dict[str, Any]:
    """The keywords SQLAlchemy's ``URL.translate_connect_args`` gives: user name, password and
    database unquoted, the host as written, the port a number; empty ones left out."""
    found: dict[str, Any] = {}
    for part, key in (("username", "user"), ("password", "password"), ("database", database_key)):
        if parts[part]:
            found[key] = unquote(parts[part])
    host = parts["ipv4host"] or parts["ipv6host"]
    if host:
        found["host"] = host
    if parts["port"]:
        found["port"] = int(parts["port"])  # a port that is not a number: the caller gives up
    return found


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _postgresql(parts: dict[str, Any], query: dict[str, str], driver: str) -> Any:
    # Any PostgreSQL driver reaches the same server: the probe reads it with the lightest one
    # installed (psycopg2, else psycopg 3); SQLAlchemy hands query values to both as keywords.
    if driver not in ("", "psycopg2", "psycopg", "psycopg2cffi", "asyncpg", "pg8000"):
        return None
    if driver == "asyncpg" and query:  # asyncpg's own keywords mean nothing to libpq
        return None
    try:
        kwargs = _credentials(parts, "dbname")
    except ValueError:
        return None
    kwargs.update(query)
    kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    for name in ("psycopg2", "psycopg"):
        module = _import(name)
        if module is not None:
            return lambda: module.connect(**kwargs)
    return None


def _mysql(parts: dict[str, Any], query: dict[str, str], driver: str) -> Any:
    if driver not in ("pymysql", "aiomysql", "asyncmy") or set(query) - {"charset"}:
        return None
    module = _import("pymysql")
    if module is None:
        return None
    try:
        kwargs = _credentials(parts, "database")
    except ValueError:
        return None
    kwargs["charset"] = query.get("charset", "utf8mb4")
    kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    return lambda: module.connect(**kwargs)


def _sqlite(parts: dict[str, Any], query: dict[str, str], driver: str) -> Any:
    database = unquote(parts["database"] or "")
    if driver not in ("", "pysqlite", "aiosqlite") or query or not database:
        return None
    if database == ":memory:" or database.startswith("file:"):
        return None
    import sqlite3

    path = Path(database)
    if not path.is_absolute():  # as SQLAlchemy does: relative to the working directory
        path = Path(os.getcwd()) / path
    # read-only, so that a database file that does not exist is not created by a probe
    target = f"file:{quote(path.as_posix())}?mode=ro"
    return lambda: sqlite3.connect(target, uri=True)
