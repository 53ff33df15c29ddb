"""Long revisions stay out of start-up: ``autolock_manual = True`` and ``time_budget``.

The history (written per test)::

    m1 ── x1                     start-up applies m1 and x1
      ├── m2 (manual) ── m3      m2 waits for a job, and m3 with it (it comes after m2)
      └── y1 (depends_on m2)     y1 too: it depends on m2
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from support import heads_of, stampede, worker_env

import alembic_autolock
from alembic_autolock import ConfigError, PendingMigrations, TimeBudgetExceeded

HISTORY = {
    "m1": ("None", "", "op.create_table('trace', sa.Column('rev', sa.String(20)))"),
    "x1": ("'m1'", "", ""),
    "m2": ("'m1'", "autolock_manual = True", ""),
    "m3": ("'m2'", "", ""),
    "y1": ("'m1'", "depends_on = 'm2'", ""),
}


def write_history(root: Path, history: dict[str, tuple[str, str, str]] = HISTORY) -> Path:
    versions = root / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (root / "env.py").write_text(
        "from alembic_autolock.env import run_migrations\nrun_migrations()\n"
    )
    for rev, (down, extra, first) in history.items():
        undo = (
            "op.drop_table('trace')"
            if "create_table" in first
            else f"op.execute(sa.text(\"DELETE FROM trace WHERE rev = '{rev}'\"))"
        )
        (versions / f"{rev}.py").write_text(
            textwrap.dedent(
                f'''\
                """revision {rev}"""
                import time
                import sqlalchemy as sa
                from alembic import op

                revision = "{rev}"
                down_revision = {down}
                {extra}


                def upgrade():
                    {first or "pass"}
                    op.execute(sa.text("INSERT INTO trace (rev) VALUES ('{rev}')"))


                def downgrade():
                    {undo}
                '''
            )
        )
    return root


@pytest.fixture
def ini(tmp_path: Path) -> Any:
    def make(url: str, history: dict[str, tuple[str, str, str]] = HISTORY, **settings: Any) -> str:
        root = write_history(tmp_path / "scripts", history)
        path = tmp_path / "alembic.ini"
        lines = [
            "[alembic]",
            f"script_location = {root}",
            f"sqlalchemy.url = {url.replace('%', '%%')}",
            "[alembic_autolock]",
            *(f"{k} = {v}" for k, v in settings.items()),
        ]
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    return make


def traced(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(r for (r,) in conn.execute(text("SELECT rev FROM trace")))
    finally:
        engine.dispose()


def pending_of(result: Any) -> list[str]:
    return sorted(p.revision for p in result.pending)


def test_start_up_applies_what_comes_before_the_marked_revision(pg_url: str, ini: Any) -> None:
    config = ini(pg_url)
    engine = create_engine(pg_url)
    result = alembic_autolock.ensure_migrated(engine, config=config)
    assert result.action == "upgraded"
    assert sorted(result.applied) == ["m1", "x1"]
    assert pending_of(result) == ["m2", "m3", "y1"]
    assert result.command is not None and result.command.endswith("upgrade heads")
    assert heads_of(pg_url) == {"x1"}
    assert traced(pg_url) == ["m1", "x1"]
    status = alembic_autolock.status(engine, config=config)
    assert sorted((p.revision, p.manual) for p in status.pending) == [
        ("m2", True),
        ("m3", True),
        ("y1", True),
    ]
    # the next call is answered from memory, with what still waits for the job
    again = alembic_autolock.ensure_migrated(engine, config=config)
    assert again.action == "cached" and pending_of(again) == ["m2", "m3", "y1"]
    engine.dispose()


def test_a_fresh_process_answers_without_alembic(pg_url: str, ini: Any) -> None:
    """Where only marked revisions are pending, a fresh process's answer comes from the
    manifest: no Alembic import, no revision file executed."""
    config = ini(pg_url)
    engine = create_engine(pg_url)
    alembic_autolock.ensure_migrated(engine, config=config)
    engine.dispose()
    code = (
        "import json, sys\nfrom sqlalchemy import create_engine\nimport alembic_autolock\n"
        f"r = alembic_autolock.ensure_migrated(create_engine({pg_url!r}), config={config!r})\n"
        "print(json.dumps({'action': r.action, 'pending': sorted(p.revision for p in r.pending),"
        " 'alembic': 'alembic' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(), check=True
    ).stdout
    assert json.loads(out) == {"action": "current", "pending": ["m2", "m3", "y1"], "alembic": False}


def test_the_job_applies_them_and_start_up_then_goes_on_past_them(pg_url: str, ini: Any) -> None:
    config = ini(pg_url)
    engine = create_engine(pg_url)
    alembic_autolock.ensure_migrated(engine, config=config)
    # the job runs the marked revision alone; what came after it is start-up's again
    job = alembic_autolock.upgrade(engine, "m2", config=config)
    assert job.applied == ("m2",)
    result = alembic_autolock.ensure_migrated(engine, config=config, cache_ttl=0)
    assert sorted(result.applied) == ["m3", "y1"] and result.pending == ()
    assert heads_of(pg_url) == {"x1", "m3", "y1"}
    assert traced(pg_url) == ["m1", "m2", "m3", "x1", "y1"]
    engine.dispose()


def test_an_explicit_upgrade_applies_everything(pg_url: str, ini: Any) -> None:
    config = ini(pg_url)
    engine = create_engine(pg_url)
    result = alembic_autolock.upgrade(engine, "heads", config=config)
    assert sorted(result.applied) == ["m1", "m2", "m3", "x1", "y1"]
    assert result.pending == ()
    engine.dispose()


def test_plain_alembic_ignores_the_flag(pg_url: str, ini: Any) -> None:
    from alembic.config import Config

    from alembic import command

    command.upgrade(Config(ini(pg_url)), "heads")
    assert traced(pg_url) == ["m1", "m2", "m3", "x1", "y1"]


def test_check_mode_passes_when_only_marked_revisions_are_pending(pg_url: str, ini: Any) -> None:
    config = ini(pg_url)
    engine = create_engine(pg_url)
    with pytest.raises(PendingMigrations) as caught:  # m1 and x1 are start-up's to apply
        alembic_autolock.ensure_migrated(engine, config=config, mode="check")
    assert sorted(rev for rev, _ in caught.value.pending) == ["m1", "x1"]
    alembic_autolock.upgrade(engine, "x1", config=config)
    result = alembic_autolock.ensure_migrated(engine, config=config, mode="check", cache_ttl=0)
    assert result.action == "current" and pending_of(result) == ["m2", "m3", "y1"]
    engine.dispose()


def test_a_fleet_applies_the_start_up_part_once(pg_url: str, ini: Any) -> None:
    config = ini(pg_url)
    outcomes = stampede(6, config, pg_url)
    assert all(o.returncode == 0 for o in outcomes), [o.data or o.stderr for o in outcomes]
    actions = sorted(o.data["action"] for o in outcomes)
    assert actions.count("upgraded") == 1 and set(actions) == {"current", "upgraded"}
    assert traced(pg_url) == ["m1", "x1"]


def test_the_marked_revision_warns_each_start(
    sqlite_url: str, ini: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = ini(sqlite_url)
    with caplog.at_level("WARNING", logger="alembic.autolock"):
        alembic_autolock.ensure_migrated(create_engine(sqlite_url), config=config)
    warned = [
        r for r in caplog.records if getattr(r, "autolock_event", "") == "migration.manual_pending"
    ]
    assert warned and sorted(warned[0].autolock_fields["pending"]) == ["m2", "m3", "y1"]
    assert "upgrade heads" in warned[0].autolock_fields["command"]


# --- time_budget -------------------------------------------------------------------------------

SLOW = {
    "s1": ("None", "", "op.create_table('trace', sa.Column('rev', sa.String(20)))"),
    "s2": ("'s1'", "", "time.sleep(0.4)"),
}


def test_start_up_refuses_a_run_known_to_take_longer_than_the_budget(pg_url: str, ini: Any) -> None:
    config = ini(pg_url, SLOW)
    engine = create_engine(pg_url)
    alembic_autolock.upgrade(engine, "heads", config=config)  # records the durations
    known = alembic_autolock.durations(engine, config=config)
    assert set(known) == {"s1", "s2"} and known["s2"] >= 0.4
    alembic_autolock.downgrade(engine, "s1", config=config)
    with pytest.raises(TimeBudgetExceeded) as caught:
        alembic_autolock.ensure_migrated(engine, config=config, time_budget=0.2)
    error = caught.value
    assert error.revisions == ("s2",) and error.total_s >= 0.4 and error.setting == "time_budget"
    assert "nothing was applied" in str(error) and "upgrade head" in error.command
    assert heads_of(pg_url) == {"s1"}
    # the lock was released, and a budget that fits lets start-up run
    result = alembic_autolock.ensure_migrated(engine, config=config, time_budget=5, cache_ttl=0)
    assert result.applied == ("s2",)
    engine.dispose()


def test_durations_carried_in_a_file_from_another_database(tmp_path: Path, ini: Any) -> None:
    staging_url = f"sqlite:///{tmp_path / 'staging.db'}"
    prod_url = f"sqlite:///{tmp_path / 'prod.db'}"
    config = ini(staging_url, SLOW)
    staging = create_engine(staging_url)
    alembic_autolock.upgrade(staging, "heads", config=config)
    carried = tmp_path / "durations.json"
    carried.write_text(
        json.dumps({"durations": alembic_autolock.durations(staging, config=config)})
    )
    prod = create_engine(prod_url)
    with pytest.raises(TimeBudgetExceeded):
        alembic_autolock.ensure_migrated(
            prod, config=config, time_budget=0.2, durations_file=str(carried)
        )
    assert heads_of(prod_url) == set()
    # without known durations nothing is refused
    result = alembic_autolock.ensure_migrated(prod, config=config, time_budget=0.2, cache_ttl=0)
    assert result.applied == ("s1", "s2")
    # an explicit upgrade is an operator's decision: no budget
    alembic_autolock.downgrade(prod, "base", config=config)
    done = alembic_autolock.upgrade(
        prod, "heads", config=config, time_budget=0.2, durations_file=str(carried)
    )
    assert done.applied == ("s1", "s2")


def test_a_durations_file_that_is_missing_or_not_one(tmp_path: Path, ini: Any) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    config = ini(url, SLOW)
    engine = create_engine(url)
    with pytest.raises(ConfigError, match="does not exist"):
        alembic_autolock.ensure_migrated(
            engine, config=config, time_budget=1, durations_file=str(tmp_path / "none.json")
        )
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ConfigError, match="not a durations document"):
        alembic_autolock.ensure_migrated(
            engine, config=config, time_budget=1, durations_file=str(bad), cache_ttl=0
        )
    assert heads_of(url) == set()


def test_the_web_trigger_is_a_start_up_path(pg_url: str, ini: Any) -> None:
    """POST /upgrade with no body leaves the marked revisions for the job, as start-up does, and
    lists them; with an explicit revision it applies them."""
    from alembic_autolock.web import make_wsgi_app

    config = ini(pg_url)
    engine = create_engine(pg_url)
    app = make_wsgi_app(engine, config=config, web_token="t0ken-for-test")

    def post(body: bytes) -> tuple[str, dict[str, Any]]:
        import io
        import json

        got: list[str] = []
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/upgrade",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            "HTTP_AUTHORIZATION": "Bearer t0ken-for-test",
        }
        out = b"".join(app(environ, lambda status, headers: got.append(status)))
        return got[0], json.loads(out)

    status, doc = post(b"")
    assert status.startswith("200")
    assert sorted(doc["result"]["applied"]) == ["m1", "x1"]
    assert sorted(p["revision"] for p in doc["result"]["pending"]) == ["m2", "m3", "y1"]
    assert traced(pg_url) == ["m1", "x1"]
    status, doc = post(b'{"revision": "heads"}')
    assert status.startswith("200")
    assert sorted(doc["result"]["applied"]) == ["m2", "m3", "y1"]
    engine.dispose()
