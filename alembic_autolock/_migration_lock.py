"""migration_lock(): the runner's own lock, for code that migrates by another path.

A custom ``MigrationContext`` with its own ``fn``, a ``create_all()`` + stamp done by hand, a
data backfill: whatever runs inside ``with migration_lock(engine) as conn:`` runs with exactly
the lock ``ensure_migrated`` takes (same settings, same namespace, the same waiting without a
session, the same events), on a connection that holds the fence, so no other migrator in any
process runs beside it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from . import _state
from ._config import ConfigLike, load_config
from ._db import open_connection
from ._mask import mask_url, parse_url
from ._plan import check_identifiers, derive_namespace
from ._run import autocommit, migration_session
from ._runner import make_lock
from ._settings import resolve_settings
from .exceptions import ConfigError
from .locks._session import close


@contextmanager
def migration_lock(
    engine_or_url: Engine | URL | str, *, config: ConfigLike = None, **settings: Any
) -> Iterator[Connection]:
    """Hold the migration lock and yield a fresh connection that holds the fence.

    ``engine_or_url`` is the application's Engine (the lock and the connection are made as its
    connections are) or a database URL. ``config`` and ``settings`` are those of
    ``ensure_migrated``: with no ``config`` and no alembic.ini to be found, the settings come
    from the keyword arguments and the environment only.

    The connection has executed nothing a migration could mistake for its caller's
    transaction, so ``MigrationContext.configure(conn, ...)`` owns its transactions as under
    env.py. It is closed (never returned to a pool) when the block ends, then the lock is
    released. Waiting longer than ``timeout`` raises LockTimeout. The library's journal is not
    consulted here: this is also the place to repair what it reports.

    .. versionadded:: 0.2
    """
    owned: Engine | None = None
    if isinstance(engine_or_url, Engine):
        engine = engine_or_url
    elif isinstance(engine_or_url, str | URL):
        url = engine_or_url if isinstance(engine_or_url, URL) else parse_url(engine_or_url, "URL")
        engine = owned = create_engine(url, poolclass=NullPool)
    else:
        raise ConfigError(
            f"migration_lock() takes an SQLAlchemy Engine or a database URL, not "
            f"{type(engine_or_url).__name__}"
        )
    try:
        cfg = _find_config(config)
        resolved = resolve_settings(settings, cfg)
        check_identifiers(resolved, engine)
        namespace = derive_namespace(resolved, engine)
        lock, migration_engine = make_lock(engine, resolved, namespace)
        lock.acquire()
        try:
            conn = open_connection(
                migration_engine,
                mask_url(migration_engine.url),
                deadline=time.monotonic() + resolved.timeout,
            )
            try:
                if autocommit(conn):
                    conn.execution_options(isolation_level=conn.default_isolation_level)
                with migration_session(
                    lock, conn, engine=migration_engine, settings=resolved, script=None, owned=True
                ):
                    yield conn
            finally:
                if migration_engine.dialect.name == "sqlite":
                    conn.close()
                else:
                    close(conn)
        finally:
            lock.release()
            _state.heads.clear()  # what this process knew of the heads may be stale now
    finally:
        if owned is not None:
            owned.dispose()


def _find_config(config: ConfigLike) -> Any:
    """The Alembic configuration as ensure_migrated finds it, or None when there is none to be
    found (no ``config``, no ``$ALEMBIC_CONFIG``, no ./alembic.ini or ./pyproject.toml)."""
    if config is None and not os.environ.get("ALEMBIC_CONFIG"):
        if not (os.path.isfile("alembic.ini") or os.path.isfile("pyproject.toml")):
            return None
        try:
            return load_config(None, environ=os.environ)
        except ConfigError:
            if os.path.isfile("alembic.ini"):
                raise
            return None  # a pyproject.toml without an Alembic table
    return load_config(config, environ=os.environ)
