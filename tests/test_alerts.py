"""alembic_autolock.alerts: callbacks and the webhook, against real local HTTP servers: one that
answers, one that hangs, one that refuses. The migration's result never depends on them."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from support import finish, start_worker, wait_for, worker_env

from alembic_autolock import MigrationFailed, alerts, ensure_migrated
from alembic_autolock import _events as events


@pytest.fixture(autouse=True)
def _no_callbacks() -> Iterator[None]:
    alerts.clear()
    yield
    alerts.flush(10)
    alerts.clear()


@pytest.fixture
def seen() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The alert.sent / alert.failed events, as (name, fields)."""
    got: list[tuple[str, dict[str, Any]]] = []
    unsubscribe = events.subscribe(
        lambda name, level, fields: got.append((name, dict(fields))),
        [events.ALERT_SENT, events.ALERT_FAILED],
    )
    yield got
    unsubscribe()


@contextmanager
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local HTTP server that records each POSTed JSON body."""
    bodies: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            bodies.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hooks/S3cr3t-path", bodies
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hanging_server() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def test_a_failure_posts_json_and_calls_back(
    sqlite_url: str,
    make_ini: Any,
    make_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
    seen: list[tuple[str, dict[str, Any]]],
) -> None:
    """A failed revision raises as always, calls on_failure with the Alert, and POSTs it to the
    webhook; the event names the webhook without its secret path."""
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r2")
    called: list[alerts.Alert] = []
    alerts.on_failure(called.append)
    with receiver() as (url, bodies):
        ini = make_ini(sqlite_url, alert_webhook=url)
        with pytest.raises(MigrationFailed):
            ensure_migrated(make_engine(sqlite_url), config=ini)
        assert alerts.flush(10)
    assert [a.kind for a in called] == ["failure"]
    assert called[0].message.startswith("migration r2 failed: RuntimeError: revision r2 failed")
    [body] = bodies
    assert (body["source"], body["kind"], body["event"]) == (
        "alembic-autolock",
        "failure",
        "migration.failed",
    )
    assert body["message"] == called[0].message
    assert body["environment"] == "development" and body["fields"]["revision"] == "r2"
    assert body["namespace"].startswith("alembic_autolock:")
    name, fields = seen[-1]
    assert (name, fields["target"], fields["kind"]) == (
        "alert.sent",
        f"{url.split('/hooks')[0]}/...",
        "failure",
    )
    assert "S3cr3t" not in repr(seen)


def test_slack_body(
    sqlite_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alert_format = slack posts Slack's {"text": ...}."""
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r1")
    with receiver() as (url, bodies):
        ini = make_ini(sqlite_url, alert_webhook=url, alert_format="slack")
        with pytest.raises(MigrationFailed):
            ensure_migrated(make_engine(sqlite_url), config=ini)
        assert alerts.flush(10)
    [body] = bodies
    assert list(body) == ["text"]
    assert body["text"].startswith("alembic-autolock failure in development on ")
    assert ": migration r1 failed: RuntimeError" in body["text"]


@pytest.mark.parametrize("server", ["hangs", "refuses"])
def test_a_webhook_that_hangs_or_refuses_changes_nothing(
    server: str,
    sqlite_url: str,
    make_ini: Any,
    make_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
    seen: list[tuple[str, dict[str, Any]]],
) -> None:
    """The run raises the same error at once; the webhook is tried twice and an alert.failed
    event says so."""
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r1")
    with hanging_server() if server == "hangs" else _nothing(refused_url()) as url:
        ini = make_ini(sqlite_url, alert_webhook=url, alert_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(MigrationFailed, match="migration r1 failed"):
            ensure_migrated(make_engine(sqlite_url), config=ini)
        assert time.monotonic() - started < 2  # not blocked by the webhook
        assert alerts.flush(10)
    name, fields = seen[-1]
    assert (name, fields["attempts"], fields["kind"]) == ("alert.failed", 2, "failure")
    expected = "timed out" if server == "hangs" else "refused"
    assert expected in fields["error"].lower()


@contextmanager
def _nothing(url: str) -> Iterator[str]:
    yield url


def test_a_callback_that_raises_is_reported(
    sqlite_url: str,
    make_ini: Any,
    make_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
    seen: list[tuple[str, dict[str, Any]]],
) -> None:
    """A callback that raises does not reach the run; alert.failed names it."""
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r1")

    @alerts.on_failure
    def broken(alert: alerts.Alert) -> None:
        raise ValueError("pager is down")

    with pytest.raises(MigrationFailed):
        ensure_migrated(make_engine(sqlite_url), config=make_ini(sqlite_url))
    assert alerts.flush(10)
    [(name, fields)] = seen
    assert (name, fields["error"]) == ("alert.failed", "ValueError: pager is down")
    assert "broken" in fields["target"]


def test_lock_wait_past_the_threshold_alerts_once(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A wait that lasts past alert_lock_wait calls on_lock_wait once, while it goes on, with
    the holder; the run then goes on as usual."""
    got: list[alerts.Alert] = []
    alerts.on_lock_wait(got.append)
    ini = make_ini(pg_url, alert_lock_wait=0.3)
    env = worker_env(AUTOLOCK_TEST_SLEEP="0.4", AUTOLOCK_TEST_TRACE=str(trace.path))
    holder = start_worker(ini, pg_url, env=env)
    try:
        assert wait_for(lambda: trace.lines(), 30)
        result = ensure_migrated(make_engine(pg_url), config=ini)
    finally:
        assert finish(holder).returncode == 0
    assert alerts.flush(10)
    assert result.action == "current" and result.waited_s > 0.3
    [alert] = got
    assert (alert.kind, alert.event) == ("lock_wait", "lock.waiting")
    assert re.match(r"waiting 0\.\ds so far for the postgresql migration lock", alert.message)
    assert f":{holder.pid}:" in alert.message  # the holder's owner tag
    assert alert.fields["waited_s"] >= 0.3


def test_a_short_wait_does_not_alert(sqlite_url: str, make_ini: Any, make_engine: Any) -> None:
    """No lock_wait alert when the lock comes before the threshold (nor without a wait)."""
    got: list[alerts.Alert] = []
    alerts.on_lock_wait(got.append)
    ensure_migrated(make_engine(sqlite_url), config=make_ini(sqlite_url, alert_lock_wait=0.2))
    time.sleep(0.3)
    assert alerts.flush(10)
    assert got == []


def test_ahead_and_lock_lost(sqlite_url: str, make_ini: Any, make_engine: Any) -> None:
    """on_ahead fires when the database is at a revision the scripts do not know; on_lock_lost
    on lock.lost (emitted here directly: losing a lock is the backends' tests' business)."""
    from sqlalchemy import text

    ahead: list[alerts.Alert] = []
    lost: list[alerts.Alert] = []
    alerts.on_ahead(ahead.append)
    alerts.on_lock_lost(lost.append)
    engine, ini = make_engine(sqlite_url), make_ini(sqlite_url)
    ensure_migrated(engine, config=ini)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'zz9'"))
    assert ensure_migrated(engine, config=ini, cache_ttl=0).action == "ahead"
    events.emit(
        events.LOCK_LOST,
        "error",
        backend="redis",
        namespace="ns",
        reason="the key expired",
        revision="r3",
        during=False,
    )
    assert alerts.flush(10)
    assert [a.kind for a in ahead] == ["ahead"]
    assert ahead[0].message.startswith(f"the database {sqlite_url} is at zz9, which these")
    assert [a.message for a in lost] == [
        "lost the redis migration lock 'ns' (the key expired) at revision r3"
    ]


def test_a_bad_webhook_setting_is_a_config_error(
    sqlite_url: str, make_ini: Any, make_engine: Any
) -> None:
    """alert_webhook must be an http(s) URL; the error does not echo it."""
    from alembic_autolock import ConfigError

    with pytest.raises(ConfigError, match="alert_webhook") as info:
        ensure_migrated(make_engine(sqlite_url), config=make_ini(sqlite_url), alert_webhook="x:S3")
    assert "S3" not in str(info.value)
