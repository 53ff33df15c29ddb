"""Structured events.

The library never configures structlog. When the application has configured it, events go
through the application's structlog pipeline under the logger name ``alembic.autolock``. When
it has not, they go to the stdlib logger ``alembic.autolock``, a child of Alembic's own logger
(so a project's ``[logger_alembic]`` governs them, and an unconfigured app, or
``alembic upgrade --sql``, never gets events printed on stdout); the message is
``event key=value ...`` and the fields are also on the record as ``autolock_event`` and
``autolock_fields``. URLs in fields are masked by the caller (``_mask.mask_url``).

structlog itself is only touched if the application imported it: an application that does not
use structlog cannot have configured it, and does not pay for importing it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# Under Alembic's own logger, so that a project's existing [logger_alembic] (INFO in every
# alembic.ini Alembic generates) shows the events without a new section.
LOGGER_NAME = "alembic.autolock"

# Event names: part of the documented contract (docs/events.md).
CHECK_CURRENT = "check.current"
CHECK_PENDING = "check.pending"
CHECK_AHEAD = "check.ahead"
MODE_OFF = "check.skipped"
LOCK_WAITING = "lock.waiting"
LOCK_ACQUIRED = "lock.acquired"
LOCK_RELEASED = "lock.released"
LOCK_TIMEOUT = "lock.timeout"
LOCK_DISABLED = "lock.disabled"
LOCK_LOST = "lock.lost"
LOCK_RELEASE_FAILED = "lock.release_failed"
LOCK_CLEARED = "lock.cleared"
MIGRATION_STARTED = "migration.started"
MIGRATION_STEP = "migration.step"
MIGRATION_COMPLETED = "migration.completed"
MIGRATION_FAILED = "migration.failed"
MIGRATED_BY_OTHER = "migration.done_by_other"
MIGRATION_INTERRUPTED = "migration.interrupted"
MIGRATION_RESOLVED = "migration.resolved"
MIGRATION_RETRY = "migration.retry"
MANUAL_PENDING = "migration.manual_pending"
OVER_BUDGET = "migration.over_budget"
DATABASE_CREATED = "migration.created"
POOL_REFRESHED = "pool.refreshed"
GATE_CLOSED = "gate.closed"
ORPHAN_WAITING = "orphan.waiting"
ORPHAN_GONE = "orphan.gone"
ORPHAN_TERMINATED = "orphan.terminated"

_stdlib_logger = logging.getLogger(LOGGER_NAME)


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _structlog_logger() -> Any:
    """The application's structlog logger, if it configured structlog; else None."""
    structlog = sys.modules.get("structlog")
    if structlog is None or not structlog.is_configured():
        return None
    return structlog.stdlib.get_logger(LOGGER_NAME)


def wants(level: str = "info") -> bool:
    """Whether an event of ``level`` would go anywhere (to build costly fields only then)."""
    if _structlog_logger() is not None:
        return True
    return _stdlib_logger.disabled or _stdlib_logger.isEnabledFor(_LEVELS[level])


def emit(event: str, level: str = "info", **fields: Any) -> None:
    """Emit one event (see the module docstring for where it goes)."""
    structured = _structlog_logger()
    if structured is not None:
        getattr(structured, level)(event, **fields)
        return
    levelno = _LEVELS[level]
    if _stdlib_logger.disabled:
        # logging.config's disable_existing_loggers (dictConfig's default, Django's LOGGING)
        # switches off every logger it does not name; the events must not vanish with it
        _stdlib_logger.disabled = False
    if _stdlib_logger.isEnabledFor(levelno):
        text = " ".join([event, *(f"{k}={v}" for k, v in fields.items())])
        _stdlib_logger.log(
            levelno, text, extra={"autolock_event": event, "autolock_fields": fields}
        )
