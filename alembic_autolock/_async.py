"""The runner for SQLAlchemy's AsyncEngine: asyncpg, psycopg 3's async mode, aiosqlite,
aiomysql/asyncmy.

The runner is synchronous; here it runs inside ``greenlet_spawn``, as ``AsyncConnection.run_sync``
runs code: each database call awaits the async driver (no second, synchronous driver is needed),
and the library's own waits and file system work are handed to the event loop (``_wait.py``),
so a loop keeps serving other tasks while this one waits for the lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from ._config import ConfigLike
from ._results import MigrationResult
from .exceptions import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

_T = TypeVar("_T")


def _sync_engine(engine: Any, function: str) -> Any:
    from sqlalchemy.ext.asyncio import AsyncEngine

    if not isinstance(engine, AsyncEngine):
        raise ConfigError(
            f"{function}() takes an SQLAlchemy AsyncEngine (create_async_engine(...)), not "
            f"{type(engine).__name__}; for a synchronous Engine, call the function without "
            "_async"
        )
    return engine.sync_engine


async def run_in_greenlet(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` where an async driver's calls can be awaited."""
    from sqlalchemy.util.concurrency import greenlet_spawn

    return await greenlet_spawn(fn, *args, **kwargs)


async def ensure_migrated_async(
    engine: AsyncEngine,
    *,
    config: ConfigLike = None,
    target_metadata: Any = None,
    **settings: Any,
) -> MigrationResult:
    """``ensure_migrated`` for an AsyncEngine: the same cache, lock, fence and journal, and the
    same result; waiting for the lock never blocks the event loop.

    .. versionadded:: 0.2
    """
    from ._cold import ensure_migrated

    sync = _sync_engine(engine, "ensure_migrated_async")
    return await run_in_greenlet(
        ensure_migrated, sync, config=config, target_metadata=target_metadata, **settings
    )


async def upgrade_async(
    engine: AsyncEngine, revision: str = "heads", *, config: ConfigLike = None, **settings: Any
) -> MigrationResult:
    """``upgrade`` for an AsyncEngine."""
    from ._runner import upgrade

    sync = _sync_engine(engine, "upgrade_async")
    return await run_in_greenlet(upgrade, sync, revision, config=config, **settings)


async def downgrade_async(
    engine: AsyncEngine, revision: str, *, config: ConfigLike = None, **settings: Any
) -> MigrationResult:
    """``downgrade`` for an AsyncEngine (gated as ``downgrade``)."""
    from ._runner import downgrade

    sync = _sync_engine(engine, "downgrade_async")
    return await run_in_greenlet(downgrade, sync, revision, config=config, **settings)


async def status_async(engine: AsyncEngine, *, config: ConfigLike = None, **settings: Any) -> Any:
    """``status`` for an AsyncEngine."""
    from ._runner import status

    sync = _sync_engine(engine, "status_async")
    return await run_in_greenlet(status, sync, config=config, **settings)


@asynccontextmanager
async def migration_lock_async(
    engine: AsyncEngine, *, config: ConfigLike = None, **settings: Any
) -> AsyncIterator[AsyncConnection]:
    """``migration_lock`` for an AsyncEngine: ``async with migration_lock_async(engine) as
    conn`` holds the lock and yields an AsyncConnection that holds the fence (use
    ``await conn.run_sync(...)`` for Alembic's synchronous APIs)."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._migration_lock import migration_lock

    sync = _sync_engine(engine, "migration_lock_async")
    held = migration_lock(sync, config=config, **settings)
    conn = await run_in_greenlet(held.__enter__)
    try:
        yield AsyncConnection(engine, conn)
    except BaseException as exc:
        if not await run_in_greenlet(held.__exit__, type(exc), exc, exc.__traceback__):
            raise
    else:
        await run_in_greenlet(held.__exit__, None, None, None)
