"""Structured events: what is emitted, in which order, and where it goes."""

from __future__ import annotations

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
