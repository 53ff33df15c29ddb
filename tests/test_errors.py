"""Every failure is a library error that says what happened; the cache belongs to one engine;
the SQLite file lock names its holder and follows the database's real path."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from support import heads_of, holder_hanging_in

from alembic_autolock import (
    ConfigError,
    DatabaseUnavailable,
    LockTimeout,
    ensure_migrated,
    status,
)
from alembic_autolock._runner import downgrade, lock_holders, unlock
from alembic_autolock.cli import main

DEAD_PG = "postgresql+psycopg2://postgres:S3cr3t-dead@127.0.0.1:1/nowhere"


@pytest.mark.parametrize(
    "call",
    [
        lambda e, ini: lock_holders(e, config=ini),
        lambda e, ini: unlock(e, force=True, config=ini),
        lambda e, ini: downgrade(e, "base", config=ini),
        lambda e, ini: status(e, config=ini),
        lambda e, ini: ensure_migrated(e, config=ini),
    ],
    ids=["holders", "unlock", "downgrade", "status", "ensure_migrated"],
)
def test_database_down_is_database_unavailable(call: Any, make_ini: Any, make_engine: Any) -> None:
    """Every entry point against a database that refuses connections raises
    DatabaseUnavailable with the URL masked, never a driver exception."""
    with pytest.raises(DatabaseUnavailable) as info:
        call(make_engine(DEAD_PG), make_ini(DEAD_PG))
    assert "S3cr3t-dead" not in str(info.value)
    assert info.value.url == "postgresql+psycopg2://postgres:***@127.0.0.1:1/nowhere"


@pytest.mark.parametrize("command", ["holders", "unlock", "status", "check", "upgrade"])
def test_cli_database_down_is_one_failed_line(
    command: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI against a database that is down: exit 2 and one FAILED line (check callers
    read 1 as "pending")."""
    assert main(["-c", make_ini(DEAD_PG), command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("FAILED: cannot connect to postgresql+psycopg2://postgres:***@")
    assert len(err.strip().splitlines()) == 1


def test_huge_timeout_is_accepted(pg_url: str, make_ini: Any, make_engine: Any) -> None:
    """timeout = 1e10 (effectively forever) works instead of overflowing a lock timeout."""
    result = ensure_migrated(make_engine(pg_url), config=make_ini(pg_url, timeout="1e10"))
    assert result.action == "upgraded"


def test_version_table_name_too_long_for_the_database(
    mysql_url: str, make_ini: Any, make_engine: Any
) -> None:
    """A version table name the database cannot hold is a ConfigError before anything runs
    (MariaDB: 64 characters)."""
    ini = make_ini(mysql_url, version_table="v" * 100)
    with pytest.raises(ConfigError) as info:
        ensure_migrated(make_engine(mysql_url), config=ini)
    assert "version_table" in str(info.value) and "64" in str(info.value)
    assert heads_of(mysql_url) == set()


def test_lock_url_with_a_wrong_password(mysql_url: str, make_ini: Any, make_engine: Any) -> None:
    """lock_url whose password the server rejects: DatabaseUnavailable, masked, nothing
    applied."""
    user = f"autolock_pw_{os.getpid()}"
    admin = create_engine(mysql_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY 'right-pw'"))
    try:
        database = mysql_url.rsplit("/", 1)[1]
        lock_url = f"mysql+pymysql://{user}:Wr0ng-pw@127.0.0.1:3306/{database}"
        with pytest.raises(DatabaseUnavailable) as info:
            ensure_migrated(make_engine(mysql_url), config=make_ini(mysql_url, lock_url=lock_url))
        assert "Wr0ng-pw" not in str(info.value)
        assert "Access denied" in str(info.value)
        assert heads_of(mysql_url) == set()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP USER IF EXISTS '{user}'@'%'"))
        admin.dispose()


# --- the in-process answer belongs to one engine ----------------------------------------------


def _schema_engine(url: str, schema: str) -> Any:
    """An engine whose sessions see ``schema`` first (SQLAlchemy's recipe for it)."""
    engine = create_engine(url)

    @event.listens_for(engine, "connect", insert=True)
    def set_path(dbapi_conn: Any, record: Any) -> None:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET SESSION search_path = {schema}")
        dbapi_conn.autocommit = autocommit

    return engine


def test_cache_is_per_engine_not_per_url(pg_url: str, make_ini: Any, engines: list[Any]) -> None:
    """Two engines on one URL with different search_path (schema per tenant) never share the
    "at head" answer: the second tenant, with no tables, is migrated, not answered cached."""
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE SCHEMA tenant_a"))
        conn.execute(text("CREATE SCHEMA tenant_b"))
    admin.dispose()
    a, b = _schema_engine(pg_url, "tenant_a"), _schema_engine(pg_url, "tenant_b")
    engines += [a, b]
    ini = make_ini(pg_url, transaction="per-migration")
    assert ensure_migrated(a, config=ini, lock="none").action == "upgraded"
    assert ensure_migrated(a, config=ini, lock="none").action == "cached"
    assert ensure_migrated(b, config=ini, lock="none").action == "upgraded"
    with b.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t1")).scalar() == 1


# --- the SQLite file lock -------------------------------------------------------------------


def test_file_lock_keeps_naming_its_holder_after_a_waiter_times_out(
    sqlite_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A waiter that times out leaves the holder's name in the lock file, so the next one
    can still say who holds it."""
    ini = make_ini(sqlite_url)
    with holder_hanging_in(ini, sqlite_url, trace, "r1") as holder:
        for _ in range(2):
            with pytest.raises(LockTimeout) as info:
                ensure_migrated(make_engine(sqlite_url), config=ini, timeout=0.3)
            assert f"pid {holder.pid} on " in str(info.value)


def test_file_lock_follows_the_real_path(tmp_path: Path, make_ini: Any, trace: Any) -> None:
    """One database reached through a symlink and through its real path: one lock file, so
    the two callers exclude each other."""
    real = tmp_path / "data" / "app.db"
    real.parent.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real.parent)
    via_link, direct = f"sqlite:///{link / 'app.db'}", f"sqlite:///{real}"
    with holder_hanging_in(make_ini(via_link), via_link, trace, "r1") as holder:
        start = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            ensure_migrated(create_engine(direct), config=make_ini(direct), timeout=0.5)
        assert time.monotonic() - start >= 0.5
        assert f"pid {holder.pid} on " in str(info.value)
    assert sorted(p.name for p in real.parent.iterdir() if p.name.endswith("-autolock")) == [
        "app.db-autolock"
    ]
    assert not any(p.name.endswith("-autolock") for p in link.parent.iterdir() if p != link)


def test_thread_waiting_for_the_process_lock_with_a_huge_timeout(
    sqlite_url: str, make_ini: Any, make_engine: Any
) -> None:
    """A second thread waits on the process-local lock with timeout = 1e10 and finds the
    database at head once the first thread is done."""
    engine = make_engine(sqlite_url)
    ini = make_ini(sqlite_url, timeout="1e10")
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_migrated(engine, config=ini).action))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["current", "upgraded"]
