"""Structured events: what is emitted, in which order, and where it goes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import pytest
from structlog.testing import capture_logs
from support import ALL_REVS, worker_env

from alembic_autolock import ensure_migrated


def test_a_migration_emits_its_events_in_order(
    sqlite_url: str, make_ini: Any, make_engine: Any
) -> None:
    """With structlog configured by the app, a run emits check, lock, step and completion
    events with their fields."""
    with capture_logs() as logs:
        ensure_migrated(make_engine(sqlite_url), config=make_ini(sqlite_url))
    names = [e["event"] for e in logs]
    assert names == [
        "check.pending",
        "lock.acquired",
        "migration.started",
        *["migration.step"] * 5,
        "lock.released",
        "migration.completed",
    ]
    assert [e["revision"] for e in logs if e["event"] == "migration.step"] == ALL_REVS
    done = logs[-1]
    assert (done["action"], done["applied"], done["heads"]) == ("upgraded", ALL_REVS, ["r5"])
    assert done["database"] == sqlite_url
    assert logs[1]["backend"] == "file"


def test_unconfigured_structlog_goes_to_stdlib_not_stdout(
    sqlite_url: str,
    make_ini: Any,
    make_engine: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without structlog configured, events are stdlib records of logger 'alembic.autolock'
    (message 'event key=value', fields as attributes), and nothing is printed."""
    with caplog.at_level(logging.INFO, logger="alembic.autolock"):
        ensure_migrated(make_engine(sqlite_url), config=make_ini(sqlite_url))
    records = [r for r in caplog.records if r.name == "alembic.autolock"]
    assert [r.autolock_event for r in records][:2] == ["check.pending", "lock.acquired"]  # type: ignore[attr-defined]
    completed = records[-1]
    assert completed.autolock_fields["applied"] == ALL_REVS  # type: ignore[attr-defined]
    assert completed.getMessage().startswith("migration.completed database=")
    assert capsys.readouterr().out == ""


def test_a_url_password_never_reaches_an_event(
    make_ini: Any, make_engine: Any, caplog: pytest.LogCaptureFixture, pg_url: str
) -> None:
    """Events carry the masked database URL."""
    url = pg_url.replace("postgres@", "postgres:sekrit-pw@")
    with caplog.at_level(logging.DEBUG, logger="alembic.autolock"):
        ensure_migrated(make_engine(url), config=make_ini(url))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "migration.completed" in text
    assert "sekrit-pw" not in text
    assert "postgres:***@" in text


def test_an_app_without_structlog_does_not_import_it(sqlite_url: str, make_ini: Any) -> None:
    """An application that never imports structlog does not get it imported (nor pay for it)."""
    code = (
        "import sys\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated\n"
        f"r = ensure_migrated(create_engine({sqlite_url!r}), config={make_ini(sqlite_url)!r})\n"
        "print(r.action, 'structlog' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["upgraded", "False"]


def _python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_listeners_see_each_run_in_order(
    sqlite_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener sees an upgrade's events, a cached check as check.cached alone (which is
    never logged), and a failure; one that raises breaks nothing; unsubscribing stops it."""
    from alembic_autolock import MigrationFailed
    from alembic_autolock import _events as events

    seen: list[str] = []

    def broken(event: str, level: str, fields: Any) -> None:
        raise RuntimeError("a listener with a bug")

    unsubscribe = events.subscribe(lambda event, level, fields: seen.append(event))
    unsubscribe_broken = events.subscribe(broken)
    engine, ini = make_engine(sqlite_url), make_ini(sqlite_url)
    try:
        assert ensure_migrated(engine, config=ini).action == "upgraded"
        assert seen == [
            "check.pending",
            "lock.acquired",
            "migration.started",
            *["migration.step"] * 5,
            "lock.released",
            "migration.completed",
        ]
        seen.clear()
        assert ensure_migrated(engine, config=ini).action == "cached"
        assert seen == ["check.cached"]
        seen.clear()
        monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r2")
        other = make_engine(sqlite_url.replace("app.db", "other.db"))
        with pytest.raises(MigrationFailed):
            ensure_migrated(other, config=make_ini(sqlite_url.replace("app.db", "other.db")))
        assert seen == [
            "check.pending",
            "lock.acquired",
            "migration.started",
            "migration.step",
            "migration.failed",
            "lock.released",
        ]
    finally:
        unsubscribe()
        unsubscribe_broken()
        unsubscribe()  # idempotent
    seen.clear()
    ensure_migrated(engine, config=ini)
    assert seen == []


def test_nobody_listens_to_a_cached_check_by_default(sqlite_url: str, make_ini: Any) -> None:
    """In an application that set up neither metrics nor listeners, the cached path finds no
    listener (it builds no event) and logs nothing."""
    ini = make_ini(sqlite_url)
    code = (
        "import logging, sys\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated, _events\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(message)s', stream=sys.stdout)\n"
        f"e = create_engine({sqlite_url!r})\n"
        f"ensure_migrated(e, config={ini!r})\n"
        "print('--')\n"
        f"print(ensure_migrated(e, config={ini!r}).action, _events.listeners_of('check.cached'))\n"
    )
    out = _python(code)
    assert out.split("--\n")[1].split() == ["cached", "()"]


def test_dictconfig_after_import_does_not_silence_the_events(
    sqlite_url: str, make_ini: Any
) -> None:
    """logging.config.dictConfig with its default disable_existing_loggers=True (Django's
    LOGGING) after the library was imported: the events still reach the handlers."""
    code = (
        "import logging.config\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated\n"
        "logging.config.dictConfig({'version': 1, 'formatters': {'named': {'format': "
        "'%(name)s: %(message)s'}}, 'handlers': {'out': {'class': 'logging.StreamHandler', "
        "'stream': 'ext://sys.stdout', 'formatter': 'named'}}, 'root': {'handlers': "
        "['out'], 'level': 'INFO'}})\n"
        f"ensure_migrated(create_engine({sqlite_url!r}), config={make_ini(sqlite_url)!r})\n"
    )
    # Alembic's own INFO lines (its plugins, "Running upgrade") reach the handler too
    ours = "alembic.autolock: "
    lines = [line[len(ours) :] for line in _python(code).splitlines() if line.startswith(ours)]
    assert lines[0].startswith("check.pending ")
    assert lines[-1].startswith("migration.completed ")


def test_under_structlog_events_carry_the_logger_name(sqlite_url: str, make_ini: Any) -> None:
    """With structlog configured (any logger factory), each event names its logger."""
    code = (
        "import structlog\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated\n"
        "structlog.configure(processors=[structlog.processors.JSONRenderer()])\n"
        f"ensure_migrated(create_engine({sqlite_url!r}), config={make_ini(sqlite_url)!r})\n"
    )
    docs = [json.loads(line) for line in _python(code).splitlines()]
    assert {d["logger"] for d in docs} == {"alembic.autolock"}
    assert docs[-1]["event"] == "migration.completed"
