"""Prometheus metrics, through ``prometheus_client`` (the ``metrics`` extra).

They are fed by the events (``_events.py``), so every path counts: ``ensure_migrated()``,
``upgrade()``/``downgrade()``, the command line and the plain ``alembic`` command.

They turn on by themselves, in the default registry, at the first event after the application
has imported ``prometheus_client`` (the library never imports it by itself: that costs about
0.1 s of start-up) unless the run's ``metrics`` setting is ``off``. :func:`enable` turns them on
explicitly, in any registry; :func:`disable` turns them off. Registering is done once per
registry and process, however many engines the process builds.

==================================================  =========  ==================================
name                                                type       labels
==================================================  =========  ==================================
``alembic_autolock_checks_total``                   counter    ``result``: cached, current,
                                                               pending, ahead, skipped
``alembic_autolock_revisions_applied_total``        counter    ``direction``: upgrade, downgrade
``alembic_autolock_failures_total``                 counter    ``kind``: migration_failed,
                                                               migration_interrupted,
                                                               lock_timeout, lock_lost
``alembic_autolock_lock_wait_seconds``              histogram  ``outcome``: acquired,
                                                               done_by_other, timeout
``alembic_autolock_migration_duration_seconds``     histogram  ``outcome``: completed, failed
``alembic_autolock_pending_revisions``              gauge      ``database`` (masked URL)
``alembic_autolock_lock_held``                      gauge      (none)
``alembic_autolock_alerts_total``                   counter    ``result``: sent, failed
==================================================  =========  ==================================

With gunicorn and ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) the
gauges aggregate across live workers: ``lock_held`` is their sum, ``pending_revisions`` their
maximum. See ``examples/gunicorn_metrics.py``.

.. versionadded:: 0.2
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import _events as events
from ._wait import task_id
from .exceptions import ConfigError

__all__ = ["NAMES", "disable", "enable"]

PREFIX = "alembic_autolock_"
NAMES = (
    "alembic_autolock_checks_total",
    "alembic_autolock_revisions_applied_total",
    "alembic_autolock_failures_total",
    "alembic_autolock_lock_wait_seconds",
    "alembic_autolock_migration_duration_seconds",
    "alembic_autolock_pending_revisions",
    "alembic_autolock_lock_held",
    "alembic_autolock_alerts_total",
)
# seconds: a cached answer is microseconds, a fleet's wait for a long migration minutes
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

_CHECKS = {
    events.CHECK_CACHED: "cached",
    events.CHECK_CURRENT: "current",
    events.CHECK_PENDING: "pending",
    events.CHECK_AHEAD: "ahead",
    events.MODE_OFF: "skipped",
}
_FAILURES = {
    events.MIGRATION_FAILED: "migration_failed",
    events.MIGRATION_INTERRUPTED: "migration_interrupted",
    events.LOCK_TIMEOUT: "lock_timeout",
    events.LOCK_LOST: "lock_lost",
}
_WAITS = {
    events.LOCK_ACQUIRED: "acquired",
    events.MIGRATED_BY_OTHER: "done_by_other",
    events.LOCK_TIMEOUT: "timeout",
}
_OTHERS = {
    events.MIGRATION_STEP,
    events.MIGRATION_STARTED,
    events.MIGRATION_COMPLETED,
    events.LOCK_RELEASED,
    events.ALERT_SENT,
    events.ALERT_FAILED,
}
WATCHED = frozenset({*_CHECKS, *_FAILURES, *_WAITS, *_OTHERS})


class _Metrics:
    """The collectors in one registry, and the listener that feeds them."""

    def __init__(self, registry: Any) -> None:
        import prometheus_client as prom

        self.registry = registry

        def make(kind: Any, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
            try:
                return kind(name, doc, labels, registry=registry, **kw)
            except ValueError:  # already in this registry (another copy of this module)
                existing = getattr(registry, "_names_to_collectors", {}).get(name)
                if existing is None:
                    raise
                return existing

        self.checks = make(
            prom.Counter,
            "alembic_autolock_checks",
            "ensure_migrated() checks, by result",
            ("result",),
        )
        self.revisions = make(
            prom.Counter,
            "alembic_autolock_revisions_applied",
            "Revisions applied (or undone), by direction",
            ("direction",),
        )
        self.failures = make(
            prom.Counter,
            "alembic_autolock_failures",
            "Runs that failed, by kind",
            ("kind",),
        )
        self.lock_wait = make(
            prom.Histogram,
            "alembic_autolock_lock_wait_seconds",
            "Time spent waiting for the migration lock, by how the wait ended",
            ("outcome",),
            buckets=BUCKETS,
        )
        self.duration = make(
            prom.Histogram,
            "alembic_autolock_migration_duration_seconds",
            "Time from the first revision starting to the run's end, by outcome",
            ("outcome",),
            buckets=BUCKETS,
        )
        self.pending = make(
            prom.Gauge,
            "alembic_autolock_pending_revisions",
            "Revisions pending, as this process last saw them",
            ("database",),
            multiprocess_mode="livemax",
        )
        self.lock_held = make(
            prom.Gauge,
            "alembic_autolock_lock_held",
            "Migration locks this process holds now",
            multiprocess_mode="livesum",
        )
        self.alerts = make(
            prom.Counter,
            "alembic_autolock_alerts",
            "Alert deliveries (webhooks), by result",
            ("result",),
        )
        self.collectors = [
            self.checks,
            self.revisions,
            self.failures,
            self.lock_wait,
            self.duration,
            self.pending,
            self.lock_held,
            self.alerts,
        ]
        self._cached = self.checks.labels("cached")
        # the pending count last set per database, and when each task's migration started
        self._last_pending: dict[str, int] = {}
        self._started: dict[tuple[int, int], float] = {}
        self._guard = threading.Lock()

    def listener(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        context = events.current_context()
        if context is not None and context.settings.metrics == "off":
            return
        if event == events.CHECK_CACHED:  # the hot path: one increment (pending is already 0)
            self._cached.inc()
            return
        result = _CHECKS.get(event)
        if result is not None:
            self.checks.labels(result).inc()
            if event == events.CHECK_PENDING:
                self._set_pending(fields, len(fields.get("pending") or ()))
            elif event != events.MODE_OFF:
                self._set_pending(fields, 0)
        kind = _FAILURES.get(event)
        if kind is not None:
            self.failures.labels(kind).inc()
            self._end_run("failed")
        outcome = _WAITS.get(event)
        if outcome is not None and fields.get("waited_s") is not None:
            self.lock_wait.labels(outcome).observe(float(fields["waited_s"]))
        if event == events.LOCK_ACQUIRED:
            self.lock_held.inc()
        elif event == events.LOCK_RELEASED:
            self.lock_held.dec()
            self._end_run("completed")
        elif event == events.MIGRATION_STARTED:
            with self._guard:
                self._started[task_id()] = time.monotonic()
        elif event == events.MIGRATION_STEP:
            self.revisions.labels(fields.get("direction") or "upgrade").inc()
        elif event == events.MIGRATION_COMPLETED:
            self._after_run(fields)
        elif event == events.MIGRATED_BY_OTHER:
            self._set_pending(fields, 0)
        elif event in (events.ALERT_SENT, events.ALERT_FAILED):
            self.alerts.labels("sent" if event == events.ALERT_SENT else "failed").inc()

    def _set_pending(self, fields: Mapping[str, Any], count: int) -> None:
        database = fields.get("database")
        if database is None:
            return
        self._last_pending[database] = count
        self.pending.labels(database).set(count)

    def _after_run(self, fields: Mapping[str, Any]) -> None:
        database = fields.get("database")
        before = self._last_pending.get(database) if database is not None else None
        action, count = fields.get("action"), int(fields.get("count") or 0)
        if action == "created":
            self._set_pending(fields, 0)
        elif before is not None and action == "upgraded":
            self._set_pending(fields, max(0, before - count))
        elif before is not None and action == "downgraded":
            self._set_pending(fields, before + count)

    def _end_run(self, outcome: str) -> None:
        with self._guard:
            started = self._started.pop(task_id(), None)
        if started is not None:
            self.duration.labels(outcome).observe(time.monotonic() - started)

    def unregister(self) -> None:
        for collector in self.collectors:
            try:
                self.registry.unregister(collector)
            except KeyError:  # someone unregistered it already
                continue


_lock = threading.Lock()
_active: _Metrics | None = None
_unsubscribe: Callable[[], None] | None = None
_disabled = False


def enable(registry: Any = None) -> None:
    """Register the metrics in ``registry`` (default: prometheus_client's ``REGISTRY``) and
    feed them from now on. Calling it again with the same registry does nothing; with another,
    the metrics move there. ConfigError when prometheus_client is not installed."""
    global _active, _unsubscribe, _disabled
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(
            "metrics need prometheus_client: pip install 'alembic-autolock[metrics]'"
        ) from exc
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _lock:
        _disabled = False
        if _active is not None and _active.registry is registry:
            return
        _stop()
        _active = _Metrics(registry)
        _unsubscribe = events.subscribe(_active.listener, WATCHED)


def disable() -> None:
    """Stop feeding the metrics and unregister them; they stay off (no automatic start) until
    :func:`enable`."""
    global _disabled
    with _lock:
        _disabled = True
        _stop()


def _stop() -> None:
    global _active, _unsubscribe
    if _unsubscribe is not None:
        _unsubscribe()
    if _active is not None:
        _active.unregister()
    _active, _unsubscribe = None, None


def enable_automatically(event: str, level: str, fields: Mapping[str, Any]) -> None:
    """The automatic start (see the module docstring), unless :func:`disable` said no; the
    event that found prometheus_client imported is the first one counted."""
    if _active is not None or _disabled:
        return
    enable()
    _feed(event, level, fields)


def _feed(event: str, level: str, fields: Mapping[str, Any]) -> None:
    if _active is not None:
        _active.listener(event, level, fields)


def enabled() -> bool:
    return _active is not None
