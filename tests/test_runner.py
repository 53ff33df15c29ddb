"""ensure_migrated / upgrade / downgrade / status against a real PostgreSQL database."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from structlog.testing import capture_logs
from support import ALL_REVS, MIGRATIONS, PG_DRIVERS, heads_of

from alembic_autolock import (
    ConfigError,
    DatabaseAhead,
    DatabaseUnavailable,
    GateClosed,
    MigrationFailed,
    MigrationInterrupted,
    PendingMigrations,
    downgrade,
    ensure_migrated,
    install,
    status,
    upgrade,
)
from alembic_autolock._mask import mask_url
from alembic_autolock._runner import resolve
from alembic_autolock.locks.postgresql import advisory_key


def advisory_locks(url: str) -> int:
    """How many sessions hold or wait for any advisory lock in the database."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND database = (SELECT oid FROM pg_database "
                        "WHERE datname = current_database())"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def environment_with(tmp_path: Path, url: str, env_py: str, ini_extra: str = "") -> str:
    """An alembic.ini for the test revisions with an env.py of the test's own; its path."""
    env_dir = tmp_path / "env"
    (env_dir / "versions").mkdir(parents=True)
    for f in (MIGRATIONS / "versions").glob("r*.py"):
        (env_dir / "versions" / f.name).write_text(f.read_text())
    (env_dir / "env.py").write_text(env_py)
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        f"[alembic]\nscript_location = {env_dir}\nprepend_sys_path = {MIGRATIONS}\n"
        f"path_separator = os\nsqlalchemy.url = {url}\n\n{ini_extra}"
    )
    return str(ini)


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_upgrades_an_empty_database_once(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """The first call applies every revision, in order, each body once."""
    result = ensure_migrated(make_engine(pg_url), config=make_ini(pg_url))
    assert (result.action, result.applied, result.heads) == ("upgraded", tuple(ALL_REVS), ("r5",))
    assert trace.bodies() == ALL_REVS
    assert heads_of(pg_url) == {"r5"}
    assert advisory_locks(pg_url) == 0


def test_at_head_is_answered_from_the_cache(pg_url: str, make_ini: Any, make_engine: Any) -> None:
    """Within cache_ttl a second call does not read the database at all."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    ensure_migrated(engine, config=ini)
    with engine.begin() as conn:  # if the cache were not used, this would be noticed
        conn.execute(text("DELETE FROM alembic_version"))
    result = ensure_migrated(engine, config=ini)
    assert (result.action, result.heads, result.applied) == ("cached", ("r5",), ())


def test_cache_disabled_or_expired_reads_the_database(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """cache_ttl = 0 disables the cache; an expired entry is checked again."""
    engine = make_engine(pg_url)
    ensure_migrated(engine, config=make_ini(pg_url))
    assert ensure_migrated(engine, config=make_ini(pg_url), cache_ttl=0).action == "current"
    ini = make_ini(pg_url, cache_ttl=0.05)
    assert ensure_migrated(engine, config=ini).action == "current"
    assert ensure_migrated(engine, config=ini).action == "cached"
    time.sleep(0.1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'r4'"))
        conn.execute(text("DROP TABLE t5"))
    result = ensure_migrated(engine, config=ini)
    assert (result.action, result.applied) == ("upgraded", ("r5",))
    assert trace.bodies() == [*ALL_REVS, "r5"]


def test_cache_ttl_zero_is_never_answered_from_the_cache(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """A call with cache_ttl = 0 reads the database even when an earlier call with the default
    TTL left an answer for the same engine."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    assert ensure_migrated(engine, config=ini).action == "upgraded"
    assert ensure_migrated(engine, config=ini).action == "cached"
    assert ensure_migrated(engine, config=ini, cache_ttl=0).action == "current"


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_failure_per_migration_keeps_the_last_good_revision(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revision that raises: MigrationFailed names it, earlier ones stay committed, the lock
    is free at once, and the next run resumes from there."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url, transaction="per-migration")
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r3")
    with capture_logs() as logs, pytest.raises(MigrationFailed) as info:
        ensure_migrated(engine, config=ini)
    err = info.value
    assert (err.revision, err.applied, err.heads) == ("r3", ("r1", "r2"), ("r2",))
    assert err.state == "database at revision r2"
    assert "revision r3 failed on purpose" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    assert not inspect(engine).has_table("t3")
    assert advisory_locks(pg_url) == 0
    failed = [e for e in logs if e["event"] == "migration.failed"]
    assert failed[0]["revision"] == "r3" and failed[0]["log_level"] == "error"

    # the lock is free at once: a caller that will not wait at all gets it
    monkeypatch.delenv("AUTOLOCK_TEST_FAIL_AT")
    result = ensure_migrated(engine, config=ini, timeout=0)
    assert (result.action, result.applied) == ("upgraded", ("r3", "r4", "r5"))
    assert trace.bodies() == ["r1", "r2", "r3", "r3", "r4", "r5"]


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_failure_in_one_transaction_leaves_database_unchanged(
    pg_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transaction = all (the default, as Alembic's) on PostgreSQL: a failure rolls back the
    whole run, and the error says so rather than listing r1 and r2 as applied."""
    engine = make_engine(pg_url)
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r3")
    with pytest.raises(MigrationFailed) as info:
        ensure_migrated(engine, config=make_ini(pg_url))
    err = info.value
    assert (err.revision, err.applied, err.heads) == ("r3", (), ())
    assert err.state == (
        "database unchanged at no revision (empty version table) (what this run did of r1, r2 "
        "was rolled back)"
    )
    assert not inspect(engine).has_table("t1")


def test_transaction_all_applies_in_one_transaction(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """transaction = all applies everything when nothing fails (autocommit_block included)."""
    result = ensure_migrated(make_engine(pg_url), config=make_ini(pg_url, transaction="all"))
    assert result.applied == tuple(ALL_REVS)


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_autocommit_block_revision_runs_outside_a_transaction(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """CREATE INDEX CONCURRENTLY inside autocommit_block() works (fresh connection, Alembic
    owns the transactions) and the index is valid."""
    engine = make_engine(pg_url)
    ensure_migrated(engine, config=make_ini(pg_url))
    with engine.connect() as conn:
        valid = conn.execute(
            text(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = 'ix_t1_note'"
            )
        ).scalar_one()
    assert valid is True


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_custom_version_table_and_schema(pg_url: str, make_ini: Any, make_engine: Any) -> None:
    """version_table and version_table_schema are used by the check and by the upgrade."""
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE SCHEMA meta"))
    ini = make_ini(pg_url, version_table="app_versions", version_table_schema="meta")
    assert ensure_migrated(engine, config=ini).action == "upgraded"
    assert heads_of(pg_url, "app_versions", "meta") == {"r5"}
    assert not inspect(engine).has_table("alembic_version")
    assert ensure_migrated(engine, config=ini, cache_ttl=0).action == "current"


def test_database_ahead_is_left_alone(pg_url: str, make_ini: Any, make_engine: Any) -> None:
    """At a revision the scripts do not know: action 'ahead' and nothing touched, or an error
    when on_ahead = error."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    ensure_migrated(engine, config=ini)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'r9_from_newer_deploy'"))
    with capture_logs() as logs:
        result = ensure_migrated(engine, config=ini, cache_ttl=0)
    assert (result.action, result.heads) == ("ahead", ("r9_from_newer_deploy",))
    assert {"event": "check.ahead", "log_level": "warning"}.items() <= logs[-1].items()
    with pytest.raises(DatabaseAhead, match="r9_from_newer_deploy"):
        ensure_migrated(engine, config=ini, on_ahead="error")
    assert heads_of(pg_url) == {"r9_from_newer_deploy"}


def test_check_mode_reports_pending_and_applies_nothing(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """mode = check: PendingMigrations lists what is pending and the command to run."""
    with pytest.raises(PendingMigrations) as info:
        ensure_migrated(make_engine(pg_url), config=make_ini(pg_url, mode="check"))
    assert [rev for rev, _ in info.value.pending] == ALL_REVS
    assert info.value.pending[0] == ("r1", "table t1")
    assert "alembic-autolock -c" in info.value.command and " upgrade" in info.value.command
    assert heads_of(pg_url) == set()


def test_mode_off_touches_nothing(pg_url: str, make_ini: Any, make_engine: Any) -> None:
    """mode = off: skipped, no connection needed."""
    result = ensure_migrated(make_engine(pg_url), config=make_ini(pg_url), mode="off")
    assert (result.action, result.applied) == ("skipped", ())
    assert heads_of(pg_url) == set()


def test_downgrade_and_the_production_gate(
    pg_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """downgrade undoes revisions in order; in production it is refused unless allowed."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    ensure_migrated(engine, config=ini)
    monkeypatch.setenv("APP_ENV", "production")
    with pytest.raises(GateClosed) as info:
        downgrade(engine, "r2", config=ini)
    assert info.value.setting == "allow_downgrade"
    assert "ALEMBIC_AUTOLOCK_ALLOW_DOWNGRADE=true" in str(info.value)
    assert heads_of(pg_url) == {"r5"}
    result = downgrade(engine, "r2", config=ini, allow_downgrade=True)
    assert (result.action, result.applied, result.heads) == (
        "downgraded",
        ("r5", "r4", "r3"),
        ("r2",),
    )
    # the cache was dropped: the next ensure_migrated sees the downgrade and upgrades again
    assert ensure_migrated(engine, config=ini).applied == ("r3", "r4", "r5")


def test_explicit_upgrade_to_a_revision(pg_url: str, make_ini: Any, make_engine: Any) -> None:
    """upgrade(engine, rev) stops at rev; upgrade at head reports current."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    assert upgrade(engine, "r2", config=ini).applied == ("r1", "r2")
    assert upgrade(engine, config=ini).applied == ("r3", "r4", "r5")
    assert upgrade(engine, "heads", config=ini).action == "current"


@pytest.mark.parametrize("op", ["upgrade", "downgrade"])
def test_unknown_revision_is_refused_before_anything_runs(
    pg_url: str, make_ini: Any, make_engine: Any, op: str
) -> None:
    """An unknown target revision: ConfigError that says so, nothing applied, no lock left."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    upgrade(engine, "r2", config=ini)
    fn = upgrade if op == "upgrade" else downgrade
    with pytest.raises(ConfigError, match=r"unknown revision 'r77'.*nothing was applied"):
        fn(engine, "r77", config=ini)
    assert heads_of(pg_url) == {"r2"}
    assert advisory_locks(pg_url) == 0


def test_unreachable_database_masks_the_password(make_ini: Any, make_engine: Any) -> None:
    """A database that cannot be reached: DatabaseUnavailable with the URL masked."""
    url = "postgresql+psycopg2://app:s3cr3t-pw@127.0.0.1:1/app"
    with pytest.raises(DatabaseUnavailable) as info:
        ensure_migrated(make_engine(url), config=make_ini(url))
    assert "s3cr3t-pw" not in str(info.value)
    assert "postgresql+psycopg2://app:***@127.0.0.1:1/app" in str(info.value)
    assert info.value.url == "postgresql+psycopg2://app:***@127.0.0.1:1/app"


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_status_reports_heads_pending_and_lock(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """status() lists pending revisions with messages and who holds the lock."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    upgrade(engine, "r3", config=ini)
    st = status(engine, config=ini)
    assert (st.current_heads, st.script_heads, st.at_head) == (("r3",), ("r5",), False)
    assert [(p.revision, p.message) for p in st.pending] == [
        (
            "r4",
            "index on t1, concurrently on PostgreSQL (outside a transaction, through "
            "autocommit_block)",
        ),
        ("r5", "table t5"),
    ]
    assert (st.lock_backend, st.holders) == ("postgresql", ())
    holder_engine = make_engine(pg_url, isolation_level="AUTOCOMMIT")
    with holder_engine.connect() as conn:
        conn.execute(text("SELECT set_config('application_name', 'someone-else', false)"))
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": advisory_key(st.namespace)})
        held = status(engine, config=ini)
    assert [h.owner for h in held.holders] == ["someone-else"]
    assert held.as_dict()["lock"]["holders"][0]["owner"] == "someone-else"


def test_install_migrates_on_first_connection(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """install(engine): the first engine.connect() runs ensure_migrated, later ones do not."""
    engine = make_engine(pg_url)
    install(engine, config=make_ini(pg_url))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t5")).scalar_one() == 1
    with engine.connect():
        pass
    assert trace.bodies() == ALL_REVS


def test_env_py_that_ignores_the_connection_is_refused(
    pg_url: str, tmp_path: Path, make_engine: Any
) -> None:
    """An env.py that opens its own connection would migrate some other database: refused
    before any revision runs."""
    ini = environment_with(
        tmp_path,
        pg_url,
        (
            "from alembic import context\n"
            "from sqlalchemy import create_engine\n"
            "url = context.config.get_main_option('sqlalchemy.url')\n"
            "with create_engine(url).connect() as conn:\n"
            "    context.configure(connection=conn)\n"
            "    with context.begin_transaction():\n"
            "        context.run_migrations()\n"
        ),
    )
    with pytest.raises(ConfigError, match="its own connection.*nothing was applied"):
        ensure_migrated(make_engine(pg_url), config=ini)
    assert heads_of(pg_url) == set()


def test_stock_env_py_logging_does_not_silence_the_app(
    pg_url: str, tmp_path: Path, make_engine: Any
) -> None:
    """Alembic's stock env.py calls fileConfig(), which disables existing loggers; an app's
    loggers are enabled again afterwards."""
    ini = environment_with(
        tmp_path,
        pg_url,
        (
            "from logging.config import fileConfig\n"
            "from alembic import context\n"
            "fileConfig(context.config.config_file_name)\n"
            "conn = context.config.attributes['connection']\n"
            "context.configure(connection=conn, transaction_per_migration=True)\n"
            "with context.begin_transaction():\n"
            "    context.run_migrations()\n"
        ),
        (
            "[loggers]\nkeys = root\n[handlers]\nkeys = h\n[formatters]\nkeys = f\n"
            "[logger_root]\nlevel = WARNING\nhandlers = h\n"
            "[handler_h]\nclass = NullHandler\nargs = ()\nformatter = f\n[formatter_f]\n"
        ),
    )
    app_logger = logging.getLogger("myapp.service")
    assert ensure_migrated(make_engine(pg_url), config=ini).action == "upgraded"
    assert app_logger.disabled is False


def test_uncommitted_env_py_run_is_reported_for_any_target(
    pg_url: str, tmp_path: Path, make_engine: Any
) -> None:
    """An env.py that lets Alembic's work sit in a transaction nobody commits (a statement ran
    on the connection before configure) is caught after the run, whatever the target."""
    ini = environment_with(
        tmp_path,
        pg_url,
        (
            "from alembic import context\n"
            "from sqlalchemy import text\n"
            "conn = context.config.attributes['connection']\n"
            "conn.execute(text('SELECT 1'))  # autobegins: Alembic now leaves committing to us\n"
            "context.configure(connection=conn, transaction_per_migration=True)\n"
            "with context.begin_transaction():\n"
            "    context.run_migrations()\n"
        ),
    )
    with capture_logs() as logs, pytest.raises(MigrationFailed) as info:
        upgrade(make_engine(pg_url), "r3", config=ini)
    err = info.value
    assert (err.revision, err.applied, err.heads) == (None, (), ())
    assert str(err).startswith(
        "env.py ran r1, r2, r3 but the database does not show them afterwards. "
        "Applied by this run: none. State left behind: database unchanged at no revision"
    )
    assert "never committed" in str(err)
    assert [e["event"] for e in logs if e["event"] == "migration.failed"] == ["migration.failed"]
    assert heads_of(pg_url) == set()


def test_sqlite_failure_is_journalled_and_not_rerun_blindly(
    sqlite_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite Alembic runs DDL outside transactions: the error says the failed revision's
    work is committed, and the next run refuses to re-run it until it is resolved."""
    engine = make_engine(sqlite_url)
    ini = make_ini(sqlite_url)
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r3")
    with pytest.raises(MigrationFailed) as info:
        ensure_migrated(engine, config=ini)
    assert info.value.state == (
        "database at revision r2; r3 ran outside a transaction, so what it did before it "
        "stopped is committed: the journal records it, and the next run will not re-run it "
        "until you say what state it left (`alembic-autolock resolve r3 --applied|--not-applied`)"
    )
    assert inspect(engine).has_table("t3")  # the half of r3 that ran is there
    monkeypatch.delenv("AUTOLOCK_TEST_FAIL_AT")
    with pytest.raises(MigrationInterrupted) as refused:
        ensure_migrated(engine, config=ini, cache_ttl=0)
    assert (refused.value.revision, refused.value.failed) == ("r3", True)
    assert "resolve r3 --not-applied" in str(refused.value)
    assert heads_of(sqlite_url) == {"r2"}
    # the operator undoes the half-run part, says so, and the next run applies r3 again
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE t3"))
    assert resolve(engine, "r3", applied=False, config=ini) == ("r2",)
    result = ensure_migrated(engine, config=ini, cache_ttl=0)
    assert (result.action, result.applied) == ("upgraded", ("r3", "r4", "r5"))


def test_pending_command_names_the_engine_url_when_the_config_differs(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """Check mode's command carries --url (masked) when the engine is not the config's URL."""
    ini = make_ini("postgresql+psycopg2://someone:pw@elsewhere/other")
    with pytest.raises(PendingMigrations) as info:
        ensure_migrated(make_engine(pg_url), config=ini, mode="check")
    assert (
        info.value.command == f"alembic-autolock -c {ini} --url '{mask_url(pg_url)}' upgrade head"
    )
    with pytest.raises(PendingMigrations) as info:
        ensure_migrated(make_engine(pg_url), config=make_ini(pg_url), mode="check")
    assert "--url" not in info.value.command
