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

Listeners. :func:`emit` is the one place every event passes, so it is also where the library's
own operator surfaces (metrics, alerts) and an application's code subscribe: ``subscribe(fn,
names)`` calls ``fn(event, level, fields)`` after each event is logged, for the event names
given (all of them when ``names`` is None). A listener that raises is reported on the stdlib
logger and never reaches the caller. A few notifications go to listeners only, never to the log
(``check.cached``: it happens on every cached call, whose whole cost is a few microseconds);
code on such a hot path asks :func:`listeners_of` first, which is a dictionary lookup, and
builds the fields only when somebody listens.

The settings of the operation in progress (``use_context``) travel beside the events in a
context variable, so that a listener can read what the run was configured with (an alert's
webhook, say) without the events carrying it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple

from ._mask import mask_url as mask_url  # re-exported: the one masking function, see _mask.py

if TYPE_CHECKING:
    from ._settings import Settings

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
# to listeners only (see the module docstring): ensure_migrated answered from the cache
CHECK_CACHED = "check.cached"
# the alerts (alembic_autolock.alerts)
ALERT_SENT = "alert.sent"
ALERT_FAILED = "alert.failed"

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


def worth(event: str, level: str = "info") -> bool:
    """Whether emitting ``event`` would reach anything: a logger, a listener, or (before the
    first event of the process) the metrics that start once prometheus_client is imported. The
    cold path at head asks, so that a process nobody listens to pays nothing."""
    if wants(level):
        return True
    if not _booted:
        return "prometheus_client" in sys.modules
    return bool(_routes.get(event, _wildcard))


def emit(event: str, level: str = "info", **fields: Any) -> None:
    """Emit one event (see the module docstring for where it goes)."""
    _log(event, level, fields)
    if not _booted:
        _boot()
    listeners = _routes.get(event, _wildcard)
    if listeners:
        _call(listeners, event, level, fields)


def _log(event: str, level: str, fields: dict[str, Any]) -> None:
    structured = _structlog_logger()
    if structured is not None:
        # the logger's name as a field: structlog's own add_logger_name needs the stdlib
        # logger factory, and an application's pipeline may have neither
        getattr(structured, level)(event, **({"logger": LOGGER_NAME} | fields))
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


# --- listeners ---------------------------------------------------------------------------

Listener = Callable[[str, str, Mapping[str, Any]], None]

# (listener, the event names it wants or None for all), in subscription order
_subscriptions: list[tuple[Listener, frozenset[str] | None]] = []
# event name -> the listeners that want it; names nobody asked for by name get _wildcard
_routes: dict[str, tuple[Listener, ...]] = {}
_wildcard: tuple[Listener, ...] = ()
_booted = False
# (un)subscribing and booting; emitting reads _routes without it (one atomic lookup)
_guard = threading.RLock()


def _rebuild() -> None:
    global _routes, _wildcard
    wildcard = tuple(fn for fn, names in _subscriptions if names is None)
    named = {name for _, names in _subscriptions if names is not None for name in names}
    _routes = {
        name: tuple(fn for fn, names in _subscriptions if names is None or name in names)
        for name in named
    }
    _wildcard = wildcard


def subscribe(listener: Listener, names: Iterable[str] | None = None) -> Callable[[], None]:
    """Call ``listener(event, level, fields)`` for each event named in ``names`` (every event
    when None), after it is logged, in the thread that emits it. Returns the function that
    unsubscribes it (idempotent). ``fields`` must not be changed."""
    entry = (listener, None if names is None else frozenset(names))
    with _guard:
        _subscriptions.append(entry)
        _rebuild()

    def unsubscribe() -> None:
        with _guard:
            if entry in _subscriptions:
                _subscriptions.remove(entry)
                _rebuild()

    return unsubscribe


def listeners_of(event: str) -> tuple[Listener, ...]:
    """The listeners of ``event``: empty when nobody listens (then there is nothing to build)."""
    return _routes.get(event, _wildcard)


def notify(event: str, level: str = "debug", **fields: Any) -> None:
    """Give ``event`` to its listeners only, without logging it."""
    listeners = _routes.get(event, _wildcard)
    if listeners:
        _call(listeners, event, level, fields)


def _call(listeners: tuple[Listener, ...], event: str, level: str, fields: dict[str, Any]) -> None:
    for listener in listeners:
        try:
            listener(event, level, fields)
        except Exception:  # a listener never breaks a migration; it is reported instead
            _stdlib_logger.warning("listener %r failed on event %s", listener, event, exc_info=True)


def _boot() -> None:
    """Subscribe the library's own listeners, on the first event of the process: the alerts,
    and the metrics once the application has imported prometheus_client."""
    global _booted
    from . import alerts

    with _guard:
        if _booted:
            return
        alerts.install()
        subscribe(_metrics_probe, EVENT_NAMES - {CHECK_CACHED, ALERT_SENT, ALERT_FAILED})
        _booted = True


def _metrics_probe(event: str, level: str, fields: Mapping[str, Any]) -> None:
    """Turn the metrics on once the application has imported prometheus_client (the library
    never imports it by itself: that costs ~0.1 s), unless this run's ``metrics`` is off."""
    if "prometheus_client" not in sys.modules:
        return
    context = _context.get()
    if context is not None and context.settings.metrics == "off":
        return
    from . import metrics

    metrics.enable_automatically(event, level, fields)


# --- the settings of the operation in progress -----------------------------------------------


class Context(NamedTuple):
    settings: Settings
    namespace: str


_context: ContextVar[Context | None] = ContextVar("alembic_autolock_context", default=None)


def use_context(settings: Settings, namespace: str) -> None:
    """Say which settings and lock namespace the events that follow, in this thread or task,
    belong to. Set at the start of each operation (the next one replaces it)."""
    _context.set(Context(settings, namespace))


def current_context() -> Context | None:
    """The settings and namespace of the operation in progress, if one said so."""
    return _context.get()


# Every event name above: the documented contract (docs/events.md).
EVENT_NAMES = frozenset(
    value
    for name, value in list(globals().items())
    if name.isupper() and isinstance(value, str) and "." in value and name != "LOGGER_NAME"
)
