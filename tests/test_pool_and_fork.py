"""After migrating, the application's pool is fresh; after a fork, a child shares no
connection with its parent."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from alembic_autolock import ensure_migrated, ensure_migrated_async, install, upgrade_async


def type_change_history(tmp_path: Path, url: str) -> str:
    """p1: table p (id, v integer); p2: v becomes text, which changes what SELECT * returns."""
    versions = tmp_path / "p" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "p" / "env.py").write_text(
        "from alembic_autolock.env import run_migrations\nrun_migrations()\n"
    )
    (versions / "p1.py").write_text(
        '"""p"""\nimport sqlalchemy as sa\nfrom alembic import op\n'
        'revision = "p1"\ndown_revision = None\nbranch_labels = None\ndepends_on = None\n'
        "def upgrade():\n"
        '    op.create_table("p", sa.Column("id", sa.Integer, primary_key=True),'
        ' sa.Column("v", sa.Integer))\n'
        '    op.execute("INSERT INTO p VALUES (1, 7)")\n'
        "def downgrade():\n    pass\n"
    )
    (versions / "p2.py").write_text(
        '"""v as text"""\nfrom alembic import op\n'
        'revision = "p2"\ndown_revision = "p1"\nbranch_labels = None\ndepends_on = None\n'
        'def upgrade():\n    op.execute("ALTER TABLE p ALTER COLUMN v TYPE text")\n'
        "def downgrade():\n    pass\n"
    )
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {tmp_path / 'p'}\nsqlalchemy.url = {url}\n")
    return str(ini)


@pytest.mark.parametrize("refresh", [True, False])
def test_pool_is_refreshed_after_migrating(refresh: bool, pg_url: str, tmp_path: Path) -> None:
    """Pooled asyncpg connections with a cached prepared SELECT * of the old schema: after
    this process migrates, the pool is replaced and the next query works; with refresh_pool =
    false a stale plan fails ("cached statement plan is invalid due to a database schema ...
    change"). (psycopg 3 re-prepares by itself.)"""
    url = make_url(pg_url).set(drivername="postgresql+asyncpg").render_as_string(False)
    ini = type_change_history(tmp_path, url)

    async def run() -> Any:
        engine = create_async_engine(url, pool_size=2, max_overflow=0)
        try:
            await upgrade_async(engine, "p1", config=ini)
            async with engine.connect() as one, engine.connect() as two:
                for conn in (one, two):  # both pooled connections cache the statement
                    (await conn.execute(text("SELECT * FROM p"))).all()
            result = await ensure_migrated_async(engine, config=ini, refresh_pool=refresh)
            assert result.applied == ("p2",)
            async with engine.connect() as conn:
                try:
                    return (await conn.execute(text("SELECT * FROM p"))).all()
                except DBAPIError as exc:
                    return exc
        finally:
            await engine.dispose()

    outcome = asyncio.run(run())
    if refresh:
        assert outcome == [(1, "7")]
    else:
        assert isinstance(outcome, DBAPIError)
        assert "cached statement plan is invalid" in str(outcome)


def test_forked_children_share_no_connection(
    pg_url: str, make_ini: Any, engines: list[Any], tmp_path: Path
) -> None:
    """ensure_migrated and install in the parent, then fork (gunicorn --preload, Celery
    prefork): each child's check and queries run on server sessions of its own, and the
    parent's connection still works afterwards."""
    ini = make_ini(pg_url)
    engine = create_engine(pg_url, pool_size=2)
    engines.append(engine)
    assert ensure_migrated(engine, config=ini).action == "upgraded"
    install(engine, config=ini)
    with engine.connect() as conn:  # an idle connection stays in the parent's pool
        parent_backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    results = tmp_path / "children.jsonl"
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # the child: migrate-check and query, report its server session
            code = 1
            try:
                action = ensure_migrated(engine, config=ini).action
                with engine.connect() as conn:
                    backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    rows = conn.execute(text("SELECT count(*) FROM t5")).scalar_one()
                with results.open("a") as f:
                    f.write(json.dumps({"action": action, "backend": backend, "rows": rows}) + "\n")
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    codes = [os.waitpid(pid, 0)[1] for pid in children]
    assert codes == [0] * 4
    reports = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["action"] for r in reports] == ["current"] * 4
    assert [r["rows"] for r in reports] == [1] * 4
    backends = {r["backend"] for r in reports}
    assert len(backends) == 4 and parent_backend not in backends
    with engine.connect() as conn:  # the children closed nothing of the parent's
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_backend
