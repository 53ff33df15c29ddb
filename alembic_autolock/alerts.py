"""Alerts: being told when something goes wrong, without having to look.

Four kinds, each raised by the events (``_events.py``) of a run:

=============  ======================================================================
``failure``    ``migration.failed``, ``migration.interrupted``, ``lock.timeout``
``lock_wait``  a wait for the lock still going on ``alert_lock_wait`` seconds after
               ``lock.waiting`` (once per wait)
``lock_lost``  ``lock.lost``
``ahead``      ``check.ahead``
=============  ======================================================================

Each alert goes to the callbacks registered in this process (:func:`on_failure`,
:func:`on_lock_wait`, :func:`on_lock_lost`, :func:`on_ahead`) and, when the run's settings name
one, to the ``alert_webhook``: a JSON POST of :meth:`Alert.as_dict` (or, with ``alert_format =
slack``, Slack's ``{"text": ...}``), with a timeout of ``alert_timeout`` seconds, retried once.

Nothing here blocks or fails a migration: callbacks and webhooks run one after another on a
background thread, and a callback that raises or a webhook that hangs or refuses is reported by
an ``alert.failed`` event (``alert.sent`` when a webhook answered). When the process exits, the
alerts still in flight get up to ``EXIT_WAIT`` seconds (a failed ``alembic-autolock upgrade``
still sends its alert); :func:`flush` waits for them at any time.

.. versionadded:: 0.2
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from . import _events as events
from ._wait import task_id

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = [
    "Alert",
    "clear",
    "flush",
    "on_ahead",
    "on_failure",
    "on_lock_lost",
    "on_lock_wait",
]

FAILURE, LOCK_WAIT, LOCK_LOST, AHEAD = "failure", "lock_wait", "lock_lost", "ahead"
KINDS = (FAILURE, LOCK_WAIT, LOCK_LOST, AHEAD)

# seconds the process waits at exit for alerts still in flight
EXIT_WAIT = 10.0
# seconds between a webhook's failed attempt and its one retry
RETRY_AFTER = 0.5


@dataclass(frozen=True)
class Alert:
    """One alert: what happened (``kind``, the ``event`` that raised it, a one-line
    ``message``), where (``environment``, ``namespace``: the lock identity, which names the
    database; ``host``, ``pid``), when (``at``, UTC), and the event's ``fields`` (URLs in them
    are masked)."""

    kind: str
    event: str
    message: str
    environment: str | None = None
    namespace: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def as_dict(self) -> dict[str, Any]:
        """The webhook's JSON body (``alert_format = json``)."""
        return {
            "source": "alembic-autolock",
            "kind": self.kind,
            "event": self.event,
            "message": self.message,
            "environment": self.environment,
            "namespace": self.namespace,
            "host": self.host,
            "pid": self.pid,
            "at": self.at.isoformat(timespec="seconds"),
            "fields": dict(self.fields),
        }

    def slack_text(self) -> str:
        """The one line of the Slack-compatible body (``alert_format = slack``)."""
        where = f" in {self.environment}" if self.environment else ""
        return f"alembic-autolock {self.kind}{where} on {self.host} (pid {self.pid}): " + (
            self.message
        )


AlertCallback = Callable[[Alert], object]
_F = TypeVar("_F", bound=AlertCallback)
_callbacks: dict[str, list[AlertCallback]] = {kind: [] for kind in KINDS}


def _register(kind: str, fn: _F) -> _F:
    candidate: object = fn  # untyped callers pass anything
    if not callable(candidate):
        from .exceptions import ConfigError

        raise ConfigError(f"on_{kind}() takes a callable, not {type(candidate).__name__}")
    _callbacks[kind].append(fn)
    return fn


def on_failure(fn: _F) -> _F:
    """Call ``fn(alert)`` when a run fails: a revision raised (``migration.failed``), a
    revision interrupted outside a transaction blocks the next run (``migration.interrupted``),
    or the lock was not acquired in time (``lock.timeout``). Usable as a decorator."""
    return _register(FAILURE, fn)


def on_lock_wait(fn: _F) -> _F:
    """Call ``fn(alert)`` when a wait for the lock has lasted ``alert_lock_wait`` seconds
    (default 10) and is still going on: once per wait."""
    return _register(LOCK_WAIT, fn)


def on_lock_lost(fn: _F) -> _F:
    """Call ``fn(alert)`` when the lock was found lost during a run (``lock.lost``)."""
    return _register(LOCK_LOST, fn)


def on_ahead(fn: _F) -> _F:
    """Call ``fn(alert)`` when the database is at revisions these scripts do not contain
    (``check.ahead``: a newer deploy migrated it)."""
    return _register(AHEAD, fn)


def clear() -> None:
    """Forget every registered callback."""
    for registered in _callbacks.values():
        registered.clear()


def flush(timeout: float = EXIT_WAIT) -> bool:
    """Wait up to ``timeout`` seconds for the alerts in flight; True if none is left."""
    return _dispatcher.drain(timeout)


# --- from events to alerts -------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _failure_message(event: str, f: Mapping[str, Any]) -> str:
    if event == events.MIGRATION_FAILED:
        what = (
            f"migration {f.get('revision')} failed"
            if f.get("revision")
            else "the migration environment (env.py) failed"
        )
        return f"{what}: {f.get('error')}. State left behind: {f.get('state')}"
    if event == events.MIGRATION_INTERRUPTED:
        return (
            f"the {f.get('direction')} of revision {f.get('revision')} was interrupted outside a "
            f"transaction (started by {f.get('holder')} at {f.get('started_at')}): upgrades stop "
            f"until `alembic-autolock resolve {f.get('revision')} --applied|--not-applied`"
        )
    holders = _text(f.get("holders") or ["unknown"])
    return (
        f"gave up after {f.get('waited_s')}s waiting for the {f.get('backend')} migration lock "
        f"{f.get('namespace')!r}, held by: {holders}"
    )


_FAILURES = (events.MIGRATION_FAILED, events.MIGRATION_INTERRUPTED, events.LOCK_TIMEOUT)
# the events that end a wait for the lock
_WAIT_ENDS = (events.LOCK_ACQUIRED, events.LOCK_TIMEOUT, events.MIGRATED_BY_OTHER)
_WATCHED = frozenset(
    {*_FAILURES, *_WAIT_ENDS, events.LOCK_WAITING, events.LOCK_LOST, events.CHECK_AHEAD}
)

# task -> the timer of its wait for the lock
_waits: dict[tuple[int, int], threading.Timer] = {}
_waits_lock = threading.Lock()


def _listener(event: str, level: str, fields: Mapping[str, Any]) -> None:
    context = events.current_context()
    settings = context.settings if context is not None else None
    namespace = context.namespace if context is not None else fields.get("namespace")
    if event in _WAIT_ENDS:
        _end_wait()
    if event == events.LOCK_WAITING:
        _start_wait(settings, namespace, fields)
    elif event in _FAILURES:
        _raise(FAILURE, event, _failure_message(event, fields), settings, namespace, fields)
    elif event == events.LOCK_LOST:
        message = (
            f"lost the {fields.get('backend')} migration lock {fields.get('namespace')!r} "
            f"({fields.get('reason')}) at revision {fields.get('revision')}"
        )
        _raise(LOCK_LOST, event, message, settings, namespace, fields)
    elif event == events.CHECK_AHEAD:
        message = (
            f"the database {fields.get('database')} is at {_text(fields.get('unknown'))}, which "
            "these migration scripts do not contain (a newer deploy migrated it?)"
        )
        _raise(AHEAD, event, message, settings, namespace, fields)


def _start_wait(
    settings: Settings | None, namespace: str | None, fields: Mapping[str, Any]
) -> None:
    threshold = settings.alert_lock_wait if settings is not None else 10.0
    if not _callbacks[LOCK_WAIT] and (settings is None or settings.alert_webhook is None):
        return
    started = time.monotonic()
    snapshot = dict(fields)

    def fire() -> None:
        with _waits_lock:
            if _waits.get(key) is not timer:
                return  # the wait ended meanwhile
            del _waits[key]
        waited = time.monotonic() - started
        holders = _text(snapshot.get("holders") or ["unknown"])
        message = (
            f"waiting {waited:.1f}s so far for the {snapshot.get('backend')} migration lock "
            f"{snapshot.get('namespace')!r}, held by: {holders}"
        )
        _raise(
            LOCK_WAIT,
            events.LOCK_WAITING,
            message,
            settings,
            namespace,
            {**snapshot, "waited_s": round(waited, 1)},
        )

    key = task_id()
    timer = threading.Timer(threshold, fire)
    timer.daemon = True
    timer.name = "alembic-autolock-lock-wait"
    with _waits_lock:
        previous = _waits.pop(key, None)
        _waits[key] = timer
    if previous is not None:
        previous.cancel()
    timer.start()


def _end_wait() -> None:
    with _waits_lock:
        timer = _waits.pop(task_id(), None)
    if timer is not None:
        timer.cancel()


def _raise(
    kind: str,
    event: str,
    message: str,
    settings: Settings | None,
    namespace: str | None,
    fields: Mapping[str, Any],
) -> None:
    callbacks = list(_callbacks[kind])
    webhook = settings.alert_webhook if settings is not None else None
    if not callbacks and webhook is None:
        return
    alert = Alert(
        kind=kind,
        event=event,
        message=message,
        environment=settings.environment if settings is not None else None,
        namespace=namespace,
        fields=dict(fields),
    )
    for fn in callbacks:
        _dispatcher.submit(lambda fn=fn: _run_callback(fn, alert))  # type: ignore[misc]
    if webhook is not None and settings is not None:
        fmt, timeout = settings.alert_format, settings.alert_timeout
        _dispatcher.submit(lambda: _send(webhook, alert, fmt, timeout))


def _run_callback(fn: AlertCallback, alert: Alert) -> None:
    try:
        fn(alert)
    except Exception as exc:
        events.emit(
            events.ALERT_FAILED,
            "warning",
            kind=alert.kind,
            target=f"callback {getattr(fn, '__qualname__', fn)!r}",
            error=_first_line(exc),
        )


def _first_line(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]


def webhook_target(url: str) -> str:
    """The webhook as events show it: scheme and host only (a Slack webhook's path is its
    secret, and a password may sit in the URL)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "?"
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}/..."


def _send(url: str, alert: Alert, fmt: str, timeout: float) -> None:
    import urllib.request

    body = alert.as_dict() if fmt == "json" else {"text": alert.slack_text()}
    data = json.dumps(body, default=str).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme was checked (http/https)
        url,
        data=data,
        headers={"Content-Type": "application/json", "User-Agent": "alembic-autolock"},
        method="POST",
    )
    error: BaseException | None = None
    for attempt in range(2):
        if attempt:
            time.sleep(RETRY_AFTER)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                response.read(65536)
                status = response.status
        except Exception as exc:  # refused, timed out, an HTTP error status: retry once
            error = exc
            continue
        events.emit(
            events.ALERT_SENT,
            kind=alert.kind,
            target=webhook_target(url),
            status=status,
            attempts=attempt + 1,
        )
        return
    events.emit(
        events.ALERT_FAILED,
        "warning",
        kind=alert.kind,
        target=webhook_target(url),
        error=_first_line(error) if error is not None else "unknown",
        attempts=2,
    )


# --- the background thread -------------------------------------------------------------------


class _Dispatcher:
    """Runs the alerts' jobs one after another on a daemon thread (one per process)."""

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._busy = 0
        self._pid = -1
        self._exit_hook = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            if self._pid != os.getpid():  # first use, or a forked child: a thread of our own
                self._pid = os.getpid()
                self._jobs.clear()
                self._busy = 0
                thread = threading.Thread(target=self._run, name="alembic-autolock-alerts")
                thread.daemon = True
                thread.start()
            if not self._exit_hook:
                self._exit_hook = True
                atexit.register(self.drain, EXIT_WAIT)
            self._jobs.append(job)
            self._busy += 1
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
            try:
                job()
            except Exception:  # noqa: S110 - each job reports its own failures; never die
                pass
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pid != os.getpid():
                return True
            while self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


_dispatcher = _Dispatcher()
_unsubscribe: Callable[[], None] | None = None


def install() -> None:
    """Subscribe the alerts to the events (done by ``_events`` on the process's first event)."""
    global _unsubscribe
    if _unsubscribe is None:
        _unsubscribe = events.subscribe(_listener, _WATCHED)
