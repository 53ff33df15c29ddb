"""alembic-autolock: safe, automatic Alembic migrations for apps that run as many copies at once.

::

    from alembic_autolock import ensure_migrated
    ensure_migrated(engine)   # exactly one process migrates; the others wait and go on

Importing the package imports neither SQLAlchemy nor Alembic (a command-line check or a pytest
plugin that only imports it pays nothing for them); ``ensure_migrated`` answers a database at head
without Alembic (``_cold.py``). Every entry point is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    TimeBudgetExceeded,
    UnversionedDatabase,
)

if TYPE_CHECKING:  # the names below are imported on first use (see __getattr__)
    from ._async import (
        downgrade_async,
        ensure_migrated_async,
        migration_lock_async,
        status_async,
        upgrade_async,
    )
    from ._cold import ensure_migrated
    from ._events import subscribe
    from ._lazy import install
    from ._migration_lock import migration_lock
    from ._results import Holder, MigrationResult, PendingRevision, Status
    from ._runner import downgrade, durations, status, upgrade
    from .schemas import SchemaResult, SchemasReport, migrate_schemas

_ON_FIRST_USE = {
    "subscribe": "._events",
    "Holder": "._results",
    "MigrationResult": "._results",
    "PendingRevision": "._results",
    "Status": "._results",
    "ensure_migrated": "._cold",
    "install": "._lazy",
    "downgrade": "._runner",
    "durations": "._runner",
    "status": "._runner",
    "upgrade": "._runner",
    "migration_lock": "._migration_lock",
    "downgrade_async": "._async",
    "ensure_migrated_async": "._async",
    "migration_lock_async": "._async",
    "status_async": "._async",
    "upgrade_async": "._async",
    "migrate_schemas": ".schemas",
    "SchemaResult": ".schemas",
    "SchemasReport": ".schemas",
}


def __getattr__(name: str) -> Any:
    module = _ON_FIRST_USE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value
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
    "SchemaResult",
    "SchemasReport",
    "Status",
    "TimeBudgetExceeded",
    "UnversionedDatabase",
    "__version__",
    "downgrade",
    "downgrade_async",
    "durations",
    "ensure_migrated",
    "ensure_migrated_async",
    "install",
    "migrate_schemas",
    "migration_lock",
    "migration_lock_async",
    "status",
    "status_async",
    "subscribe",
    "upgrade",
    "upgrade_async",
]
