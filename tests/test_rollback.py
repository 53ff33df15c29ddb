"""Rollback: guarded downgrades under the lock, full cycles on every database, offline SQL,
and the errors bad targets get."""

from __future__ import annotations

from typing import Any

import pytest
from support import ALL_REVS, heads_of

from alembic_autolock import ConfigError, downgrade, ensure_migrated, upgrade
from alembic_autolock.cli import main


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def any_url(request: pytest.FixtureRequest) -> str:
    return str(
        request.getfixturevalue(
            {"postgresql": "pg_url", "mysql": "mysql_url"}.get(request.param, "sqlite_url")
        )
    )


def test_upgrade_downgrade_upgrade_cycle(
    any_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """Up to head, down one (-1), down to a revision, down to base, up again: each revision's
    body runs once per direction and the heads follow, on PostgreSQL, MariaDB and SQLite."""
    engine = make_engine(any_url)
    ini = make_ini(any_url)
    assert ensure_migrated(engine, config=ini).applied == tuple(ALL_REVS)
    assert downgrade(engine, "-1", config=ini).applied == ("r5",)
    assert heads_of(any_url) == {"r4"}
    assert downgrade(engine, "r2", config=ini).applied == ("r4", "r3")
    result = downgrade(engine, "base", config=ini)
    assert (result.action, result.applied, result.heads) == ("downgraded", ("r2", "r1"), ())
    assert upgrade(engine, config=ini).applied == tuple(ALL_REVS)
    assert heads_of(any_url) == {"r5"}
    assert trace.bodies("down") == ["r5", "r4", "r3", "r2", "r1"]
    assert trace.bodies("up") == ALL_REVS + ALL_REVS


def test_cli_cycle_reports_what_it_did(
    pg_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's upgrade and downgrade say what they applied and undid."""
    ini = make_ini(pg_url)
    assert main(["-c", ini, "upgrade"]) == 0
    assert capsys.readouterr().out.startswith(
        "upgraded: applied r1, r2, r3, r4, r5; database now at r5"
    )
    assert main(["-c", ini, "downgrade", "r3"]) == 0
    assert capsys.readouterr().out.startswith("downgraded: undid r5, r4; database now at r3")
    assert main(["-c", ini, "upgrade", "+1"]) == 0
    assert capsys.readouterr().out.startswith("upgraded: applied r4; database now at r4")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("r9", "unknown revision 'r9'"),
        ("r5", "not a valid downgrade target"),
    ],
)
def test_bad_downgrade_target_changes_nothing(
    target: str, message: str, pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A downgrade target that is unknown, or not below the current revision: a ConfigError
    that says so, and nothing is undone."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    upgrade(engine, "r3", config=ini)
    with pytest.raises(ConfigError) as info:
        downgrade(engine, target, config=ini)
    assert message in str(info.value)
    assert heads_of(pg_url) == {"r3"}
    assert trace.bodies("down") == []


def test_offline_sql_needs_no_lock_and_no_connection(
    make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`upgrade --sql` and `downgrade --sql FROM:TO` print the SQL and say on stderr that
    nothing was locked or connected (the database here does not exist)."""
    ini = make_ini("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    assert main(["-c", ini, "upgrade", "--sql"]) == 0
    out = capsys.readouterr()
    assert "CREATE TABLE t5" in out.out and "CREATE INDEX CONCURRENTLY ix_t1_note" in out.out
    assert out.err.startswith("offline upgrade to heads: printing SQL only; no lock is taken")
    assert main(["-c", ini, "downgrade", "--sql", "r5:r3"]) == 0
    out = capsys.readouterr()
    assert "DROP TABLE t5;" in out.out and "DROP INDEX ix_t1_note;" in out.out
    assert main(["-c", ini, "downgrade", "--sql", "r3"]) == 2
    assert "downgrade --sql needs FROM:TO" in capsys.readouterr().err
