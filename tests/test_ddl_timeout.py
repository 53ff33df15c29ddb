"""DDL that never stalls traffic: ddl_lock_timeout and ddl_retries, against a real long reader.

An ``ALTER TABLE`` that waits behind a long transaction holds its place in the table's lock
queue, and every query on that table queues behind it. With ``ddl_lock_timeout`` the migration
gives up after that long, the queued queries go on, and the revision is tried again with
backoff until the reader has ended. The application's queries here carry their own database
lock timeout (3 s, far above the migration's): with the setting none of them ever hits it;
without it (the control), one does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError
from support import REPO, worker_env

import alembic_autolock
from alembic_autolock import MigrationFailed
from alembic_autolock._session_settings import lock_timed_out

REVISIONS = {
    "a1": """
        revision = "a1"
        down_revision = None

        def upgrade():
            op.create_table("orders", sa.Column("id", sa.Integer, primary_key=True))
            op.execute("INSERT INTO orders (id) VALUES (1), (2), (3)")

        def downgrade():
            op.drop_table("orders")
    """,
    "a2": """
        revision = "a2"
        down_revision = "a1"

        def upgrade():
            op.add_column("orders", sa.Column("note", sa.String(50)))

        def downgrade():
            op.drop_column("orders", "note")
    """,
}

MIGRATOR = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from sqlalchemy import create_engine
import alembic_autolock
config, url, *pairs = sys.argv[1:]
settings = dict(p.split("=", 1) for p in pairs)
try:
    r = alembic_autolock.ensure_migrated(create_engine(url), config=config, **settings)
    print(json.dumps({"action": r.action, "applied": list(r.applied)}))
except alembic_autolock.AutolockError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                      "attempts": getattr(exc, "attempts", None)}))
"""


def _scripts(tmp_path: Path, url: str) -> str:
    versions = tmp_path / "ddl" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "ddl" / "env.py").write_text(
        "from alembic_autolock.env import run_migrations\nrun_migrations()\n"
    )
    header = "import sqlalchemy as sa\nfrom alembic import op\n"
    for name, body in REVISIONS.items():
        (versions / f"{name}.py").write_text(header + textwrap.dedent(body))
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        f"[alembic]\nscript_location = {tmp_path / 'ddl'}\n"
        f"sqlalchemy.url = {url.replace('%', '%%')}\n"
    )
    return str(ini)


def _start(ini: str, url: str, **settings: Any) -> subprocess.Popen[str]:
    pairs = [f"{k}={v}" for k, v in settings.items()]
    return subprocess.Popen(
        [sys.executable, "-c", MIGRATOR, ini, url, *pairs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        cwd=REPO,
    )


_WAITING = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
    "AND query ILIKE 'ALTER TABLE orders%'",
    "mysql": "SELECT count(*) FROM information_schema.PROCESSLIST "
    "WHERE STATE LIKE 'Waiting for table metadata lock' AND INFO LIKE 'ALTER TABLE orders%'",
}
# the application's own bound on how long one query may wait for a lock
_APP_LOCK_TIMEOUT = {
    "postgresql": "SET lock_timeout = '3s'",
    "mysql": "SET SESSION lock_wait_timeout = 3",
}


def _scenario(url: str, tmp_path: Path, **settings: Any) -> tuple[int, int, dict[str, Any], str]:
    """A reader holds a transaction on ``orders`` while a migrator adds a column and the
    application queries the table. Returns (application queries that gave up on the lock,
    queries that ran, the migrator's result, its log)."""
    ini = _scripts(tmp_path, url)
    engine = create_engine(url)
    dialect = "postgresql" if engine.dialect.name == "postgresql" else "mysql"
    alembic_autolock.upgrade(engine, "a1", config=ini)
    reader = engine.connect()
    app = engine.connect()
    watcher = create_engine(url, isolation_level="AUTOCOMMIT").connect()
    migrator = None
    try:
        reader.execute(text("SELECT count(*) FROM orders")).scalar()  # holds its lock till commit
        app.execute(text(_APP_LOCK_TIMEOUT[dialect]))
        app.commit()
        migrator = _start(ini, url, **settings)
        deadline = time.monotonic() + 60
        while not watcher.execute(text(_WAITING[dialect])).scalar():
            assert migrator.poll() is None, migrator.communicate()
            assert time.monotonic() < deadline, "the ALTER never queued behind the reader"
            time.sleep(0.05)
        gave_up = ran = 0
        other: OperationalError | None = None
        until = time.monotonic() + 5  # several of the migrator's tries
        while time.monotonic() < until:
            try:
                app.execute(text("SELECT count(*) FROM orders")).scalar()
                ran += 1
            except OperationalError as exc:
                if not lock_timed_out(exc):
                    other = exc
                gave_up += 1
            app.rollback()
            time.sleep(0.1)
        assert other is None, other  # only lock timeouts are expected
        reader.commit()  # the long reader ends: the migration can go through
        out, err = migrator.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        return gave_up, ran, result, err
    finally:
        if migrator is not None and migrator.poll() is None:
            migrator.kill()
        reader.close()
        app.close()
        watcher.close()
        engine.dispose()


@pytest.fixture(params=["postgresql", "mariadb"])
def db_url(request: pytest.FixtureRequest) -> str:
    fixture = "pg_url" if request.param == "postgresql" else "mysql_url"
    return str(request.getfixturevalue(fixture))


def test_the_application_never_waits_behind_a_queued_alter(db_url: str, tmp_path: Path) -> None:
    gave_up, ran, result, log = _scenario(
        db_url, tmp_path, ddl_lock_timeout="0.5", ddl_retries="50"
    )
    assert gave_up == 0 and ran > 0
    assert result == {"action": "upgraded", "applied": ["a2"]}, (result, log)
    assert log.count("migration.retry") >= 2, log  # it gave up and tried again meanwhile
    engine = create_engine(db_url)
    try:
        assert "note" in {c["name"] for c in inspect(engine).get_columns("orders")}
    finally:
        engine.dispose()


def test_without_the_timeout_the_application_queues_behind_the_alter(
    db_url: str, tmp_path: Path
) -> None:
    """The control: the same scenario with ddl_lock_timeout = 0 blocks the application."""
    gave_up, _, result, log = _scenario(db_url, tmp_path, ddl_lock_timeout="0")
    assert gave_up > 0
    assert result == {"action": "upgraded", "applied": ["a2"]}, (result, log)
    assert "migration.retry" not in log


def test_retries_run_out_with_an_error_that_names_the_cause(pg_url: str, tmp_path: Path) -> None:
    ini = _scripts(tmp_path, pg_url)
    engine = create_engine(pg_url)
    alembic_autolock.upgrade(engine, "a1", config=ini)
    reader = engine.connect()
    try:
        reader.execute(text("SELECT count(*) FROM orders")).scalar()
        with pytest.raises(MigrationFailed) as caught:
            alembic_autolock.ensure_migrated(
                engine, config=ini, ddl_lock_timeout=0.2, ddl_retries=2, cache_ttl=0
            )
    finally:
        reader.close()
    error = caught.value
    assert error.lock_timeout and error.retriable and error.attempts == 3
    assert error.revision == "a2" and error.applied == ()
    assert "tried 3 times" in str(error) and "ddl_lock_timeout (0.2s" in str(error)
    assert "database unchanged at revision a1" in str(error)
    # the lock was released and nothing is left half-done: the next run goes through
    result = alembic_autolock.ensure_migrated(engine, config=ini, ddl_lock_timeout=0.2)
    assert result.action == "upgraded" and result.applied == ("a2",)
    engine.dispose()


def test_a_failure_that_is_not_a_lock_timeout_is_not_retried(pg_url: str, tmp_path: Path) -> None:
    ini = _scripts(tmp_path, pg_url)
    (tmp_path / "ddl" / "versions" / "a2.py").write_text(
        "revision = 'a2'\ndown_revision = 'a1'\nfrom alembic import op\n"
        "def upgrade():\n    op.execute('SELECT no_such_function()')\n"
    )
    engine = create_engine(pg_url)
    with pytest.raises(MigrationFailed) as caught:
        alembic_autolock.ensure_migrated(engine, config=ini, ddl_lock_timeout=0.2, ddl_retries=3)
    assert not caught.value.lock_timeout and caught.value.attempts == 1
    assert "tried" not in str(caught.value)
    engine.dispose()


@pytest.mark.parametrize("owned", [True, False])
def test_the_session_settings_are_the_migration_sessions_alone(
    pg_url: str, tmp_path: Path, owned: bool
) -> None:
    """lock_timeout is set on the migration session; a connection the caller handed over
    (env.py's config.attributes['connection']) gets its own value back afterwards."""
    ini = _scripts(tmp_path, pg_url)
    (tmp_path / "ddl" / "versions" / "a2.py").write_text(
        "revision = 'a2'\ndown_revision = 'a1'\nfrom alembic import op\nimport sqlalchemy as sa\n"
        "def upgrade():\n"
        "    seen = op.get_bind().execute(sa.text('SHOW lock_timeout')).scalar()\n"
        "    op.execute(sa.text('CREATE TABLE seen (v text)'))\n"
        "    op.get_bind().execute(sa.text('INSERT INTO seen VALUES (:v)'), {'v': seen})\n"
    )
    engine = create_engine(pg_url)
    if owned:
        alembic_autolock.upgrade(engine, config=ini, ddl_lock_timeout=1.5)
    else:
        from alembic.config import Config

        from alembic import command

        cfg = Config(ini)
        with engine.connect() as conn:
            conn.execute(text("SET lock_timeout = '7s'"))
            conn.commit()
            cfg.attributes["connection"] = conn
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("ALEMBIC_AUTOLOCK_DDL_LOCK_TIMEOUT", "1.5")
                command.upgrade(cfg, "head")
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "7s"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT v FROM seen")).scalar() == "1500ms"
    engine.dispose()


def test_production_gets_a_lock_timeout_by_default() -> None:
    from alembic_autolock._settings import resolve_settings

    prod = resolve_settings({}, None, {"APP_ENV": "production"})
    dev = resolve_settings({}, None, {})
    assert prod.ddl_lock_timeout == 5.0 and dev.ddl_lock_timeout == 0.0
    assert "production" in prod.source("ddl_lock_timeout")
