"""alembic-autolock: safe, automatic Alembic migrations for apps that run as many copies at once.

::

    from alembic_autolock import ensure_migrated
    ensure_migrated(engine)   # exactly one process migrates; the others wait and go on
"""

from importlib.metadata import PackageNotFoundError, version

from ._lazy import install
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
    PendingMigrations,
)
from .locks import Holder

try:
    __version__ = version("alembic-autolock")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

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
    "MigrationResult",
    "PendingMigrations",
    "PendingRevision",
    "Status",
    "__version__",
    "downgrade",
    "ensure_migrated",
    "install",
    "status",
    "upgrade",
]
