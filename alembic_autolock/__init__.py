"""alembic-autolock: safe, automatic Alembic migrations for apps that run as many copies at once.

::

    from alembic_autolock import ensure_migrated
    ensure_migrated(engine)   # exactly one process migrates; the others wait and go on
"""

from typing import Any

from ._async import (
    downgrade_async,
    ensure_migrated_async,
    migration_lock_async,
    status_async,
    upgrade_async,
)
from ._events import subscribe
from ._lazy import install
from ._migration_lock import migration_lock
from ._runner import (
    MigrationResult,
    PendingRevision,
    Status,
    downgrade,
    ensure_migrated,
    status,
    upgrade,
)
from .exceptions import (
    AutolockError,
    ConfigError,
    DatabaseAhead,
    DatabaseUnavailable,
    GateClosed,
    LockLost,
    LockTimeout,
    LockUnavailable,
    MigrationFailed,
    MigrationInterrupted,
    PendingMigrations,
    UnversionedDatabase,
)
from .locks import Holder


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the installed metadata only when asked for
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("alembic-autolock")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AutolockError",
    "ConfigError",
    "DatabaseAhead",
    "DatabaseUnavailable",
    "GateClosed",
    "Holder",
    "LockLost",
    "LockTimeout",
    "LockUnavailable",
    "MigrationFailed",
    "MigrationInterrupted",
    "MigrationResult",
    "PendingMigrations",
    "PendingRevision",
    "Status",
    "UnversionedDatabase",
    "__version__",
    "downgrade",
    "downgrade_async",
    "ensure_migrated",
    "ensure_migrated_async",
    "install",
    "migration_lock",
    "migration_lock_async",
    "status",
    "status_async",
    "subscribe",
    "upgrade",
    "upgrade_async",
]
