"""The alembic-autolock command and the env.py hook as the plain alembic CLI runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from support import PG_DRIVERS, REPO, heads_of, worker_env

from alembic_autolock._mask import mask_url
from alembic_autolock.cli import main

BIN = Path(sys.executable).parent
CLI = str(BIN / "alembic-autolock")
ALEMBIC = str(BIN / "alembic")


def run(*args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> Any:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        env=env or worker_env(),
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_upgrade_status_check_downgrade_round_trip(pg_url: str, make_ini: Any) -> None:
    """upgrade, status --json, check and downgrade through the installed console script."""
    ini = make_ini(pg_url)
    out = run(CLI, "-c", ini, "check")
    assert (out.returncode, out.stdout.strip()) == (1, "5 pending: r1, r2, r3, r4, r5")

    out = run(CLI, "-c", ini, "upgrade", "r2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("upgraded: applied r1, r2; database now at r2")

    out = run(CLI, "-c", ini, "status", "--json")
    data = json.loads(out.stdout)  # stdout holds only the JSON document
    assert (data["current_heads"], data["at_head"]) == (["r2"], False)
    assert [p["revision"] for p in data["pending"]] == ["r3", "r4", "r5"]
    assert data["lock"]["backend"] == "postgresql" and data["lock"]["holders"] == []
    assert data["database"] == mask_url(pg_url)  # pg_url carries a password

    assert run(CLI, "-c", ini, "upgrade").returncode == 0
    out = run(CLI, "-c", ini, "check")
    assert (out.returncode, out.stdout.strip()) == (0, "at head: r5")

    out = run(CLI, "-c", ini, "downgrade", "r4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("downgraded: undid r5; database now at r4")


def test_human_status_lists_pending_revisions(
    pg_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """status without --json shows current, head, pending revisions and the lock."""
    assert main(["-c", make_ini(pg_url), "status"]) == 0
    out = capsys.readouterr().out
    assert "current:     none (empty database)" in out
    assert "script head: r5" in out
    assert "pending:     5" in out and "  r5  table t5" in out
    assert "lock:        postgresql" in out and "  free" in out


def test_url_option_overrides_the_config(
    pg_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """--url wins over sqlalchemy.url."""
    ini = make_ini("postgresql+psycopg2://nobody@127.0.0.1:1/wrong")
    assert main(["-c", ini, "--url", pg_url, "upgrade"]) == 0
    assert heads_of(pg_url) == {"r5"}


def test_check_exit_2_on_error_with_masked_url(
    make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """check exits 2 when the database cannot be reached; the password is masked."""
    url = "postgresql+psycopg2://u:topsecret@127.0.0.1:1/db"
    assert main(["-c", make_ini(url), "check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("FAILED: cannot connect to postgresql+psycopg2://u:***@127.0.0.1:1/db")
    assert "topsecret" not in err


def test_errors_are_one_line_and_non_zero(
    tmp_path: Path,
    make_ini: Any,
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad input gives a single FAILED line that says what to fix."""
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 2
    assert "no Alembic configuration found; looked for:" in capsys.readouterr().err
    monkeypatch.setenv("ALEMBIC_AUTOLOCK_LOCK", "etcd")
    assert main(["-c", make_ini(sqlite_url), "upgrade"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("FAILED: invalid value 'etcd' for setting 'lock'")
    assert len(err.splitlines()) == 1
    monkeypatch.delenv("ALEMBIC_AUTOLOCK_LOCK")
    assert main(["-c", make_ini(sqlite_url), "downgrade", "nope"]) == 2
    assert "unknown revision 'nope'" in capsys.readouterr().err


def test_wait_returns_when_at_head_and_times_out_otherwise(
    sqlite_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """wait exits 0 once the database is at head, 1 when --timeout passes first."""
    ini = make_ini(sqlite_url)
    assert main(["-c", ini, "wait", "--timeout", "0.2", "--interval", "0.05"]) == 1
    assert "still not at head after 0.2s" in capsys.readouterr().err
    assert main(["-c", ini, "upgrade"]) == 0
    assert main(["-c", ini, "wait", "--timeout", "1"]) == 0


def test_init_writes_an_environment_that_uses_the_hook(tmp_path: Path, trace: Any) -> None:
    """`alembic-autolock init` writes env.py, alembic.ini with [alembic_autolock]; the
    plain alembic CLI then runs a new revision under the lock."""
    out = run(CLI, "init", "migrations", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    env_py = (tmp_path / "migrations" / "env.py").read_text()
    assert "from alembic_autolock.env import run_migrations" in env_py
    ini = (tmp_path / "alembic.ini").read_text()
    assert "[alembic_autolock]" in ini and "qualname = alembic\n" in ini
    db = tmp_path / "app.db"
    (tmp_path / "alembic.ini").write_text(
        ini.replace("driver://user:pass@localhost/dbname", f"sqlite:///{db}")
    )
    out = run(ALEMBIC, "revision", "-m", "first", "--rev-id", "a1", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    out = run(ALEMBIC, "upgrade", "head", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "lock.acquired backend=file" in out.stderr
    assert heads_of(f"sqlite:///{db}") == {"a1"}
    out = run(CLI, "init", "migrations", cwd=str(tmp_path))
    assert out.returncode == 2 and "already exists and is not empty" in out.stderr


def test_alembic_cli_offline_sql_needs_no_lock_and_no_database(make_ini: Any) -> None:
    """`alembic upgrade head --sql` renders SQL without connecting or locking."""
    ini = make_ini("postgresql+psycopg2://nobody@127.0.0.1:1/nowhere")
    out = run(ALEMBIC, "-c", ini, "upgrade", "head", "--sql")
    assert out.returncode == 0, out.stderr
    assert "CREATE TABLE t5" in out.stdout
    assert "CREATE INDEX CONCURRENTLY ix_t1_note" in out.stdout
    assert "lock." not in out.stdout + out.stderr


def test_alembic_cli_downgrade_is_gated_in_production(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """Plain `alembic downgrade` in production is refused before any revision runs."""
    ini = make_ini(pg_url)
    assert run(ALEMBIC, "-c", ini, "upgrade", "head").returncode == 0
    env = worker_env(ALEMBIC_AUTOLOCK_ENV="production", AUTOLOCK_TEST_TRACE=str(trace.path))
    out = run(ALEMBIC, "-c", ini, "downgrade", "-1", env=env)
    assert out.returncode != 0
    # Alembic's own one-line report of a CommandError, which library errors also are
    assert "FAILED: downgrade refused in environment 'production'" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    assert heads_of(pg_url) == {"r5"}
    assert trace.bodies("down") == []
    env["ALEMBIC_AUTOLOCK_ALLOW_DOWNGRADE"] = "true"
    assert run(ALEMBIC, "-c", ini, "downgrade", "-1", env=env).returncode == 0
    assert heads_of(pg_url) == {"r4"}


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_alembic_cli_failure_names_revision_and_state(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """A failing revision under the plain alembic CLI reports the revision and the state as
    Alembic's one FAILED line, as Alembic's own errors are (one transaction by default, as
    Alembic: r1 is rolled back with it)."""
    ini = make_ini(pg_url)
    env = worker_env(AUTOLOCK_TEST_FAIL_AT="r2", AUTOLOCK_TEST_TRACE=str(trace.path))
    out = run(ALEMBIC, "-c", ini, "upgrade", "head", env=env)
    assert out.returncode != 0
    assert (
        "FAILED: migration r2 failed: RuntimeError: revision r2 failed on purpose. "
        "Applied by this run before it: none. State left behind: database unchanged at no "
        "revision (empty version table) (what this run did of r1 was rolled back)."
    ) in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    assert heads_of(pg_url) == set()


def test_alembic_cli_read_only_commands_do_not_lock(pg_url: str, make_ini: Any) -> None:
    """`alembic current` runs through the hook without taking the lock."""
    ini = make_ini(pg_url)
    out = run(ALEMBIC, "-c", ini, "current")
    assert out.returncode == 0, out.stderr
    assert "lock.acquired" not in out.stderr


def test_version_table_conflict_in_env_py_is_an_error(tmp_path: Path, pg_url: str) -> None:
    """run_migrations(version_table=...) that differs from the setting is refused: the check
    would read another table than the migration writes."""
    env_dir = tmp_path / "env"
    (env_dir / "versions").mkdir(parents=True)
    (env_dir / "env.py").write_text(
        "from alembic_autolock.env import run_migrations\n"
        "run_migrations(version_table='other_versions')\n"
    )
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {env_dir}\nsqlalchemy.url = {pg_url}\n")
    out = run(ALEMBIC, "-c", str(ini), "upgrade", "head")
    assert out.returncode != 0
    assert "FAILED: run_migrations(version_table='other_versions') differs" in out.stdout


def test_example_environment_runs_on_sqlite(tmp_path: Path) -> None:
    """The repo's own example history applies on SQLite (the README's main job)."""
    db = tmp_path / "example.db"
    env = worker_env()
    out = run(CLI, "-c", str(REPO / "alembic.ini"), "--url", f"sqlite:///{db}", "upgrade", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("upgraded: applied 0001, 0002, 0003, 0004, 0005")
    assert heads_of(f"sqlite:///{db}") == {"0005"}


def test_wait_gives_up_at_once_when_the_database_is_ahead(
    sqlite_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """wait exits 2 at once if the database is at a revision the scripts do not know."""
    ini = make_ini(sqlite_url)
    assert main(["-c", ini, "upgrade"]) == 0
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'zz9'"))
    engine.dispose()
    assert main(["-c", ini, "wait", "--timeout", "60"]) == 2
    assert "the database is at zz9, unknown to these scripts" in capsys.readouterr().err
