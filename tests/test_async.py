"""AsyncEngine support on real servers: asyncpg, psycopg 3's async mode and aiosqlite, many
tasks of one loop beside other processes, an event loop that keeps running while a task waits
for the lock, FastAPI and Starlette start-up, the lazy hook, async URLs in alembic.ini."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from support import ALL_REVS, heads_of, holder_hanging_in, start_worker, wait_for, worker_env

from alembic_autolock import (
    ConfigError,
    ensure_migrated,
    ensure_migrated_async,
    install,
    migration_lock_async,
    status_async,
)
from alembic_autolock.cli import main

ALEMBIC = str(Path(sys.executable).parent / "alembic")


def async_url(url: str, driver: str) -> str:
    return make_url(url).set(drivername=driver).render_as_string(hide_password=False)


async def _dispose_after(engine: AsyncEngine, coro: Any) -> Any:
    try:
        return await coro
    finally:
        await engine.dispose()


@pytest.fixture(params=["postgresql+asyncpg", "postgresql+psycopg", "sqlite+aiosqlite"])
def async_target(request: pytest.FixtureRequest) -> str:
    """An async URL of a fresh database, for each async driver."""
    if request.param.startswith("sqlite"):
        return async_url(request.getfixturevalue("sqlite_url"), request.param)
    return async_url(request.getfixturevalue("pg_url"), request.param)


def test_ensure_migrated_async_with_each_driver(
    async_target: str, make_ini: Any, trace: Any
) -> None:
    """asyncpg, psycopg (async) and aiosqlite: upgraded once, then answered from the cache,
    with no synchronous driver involved."""
    ini = make_ini(async_target)

    async def run() -> list[str]:
        engine = create_async_engine(async_target)
        actions = []
        try:
            for _ in range(2):
                actions.append((await ensure_migrated_async(engine, config=ini)).action)
            st = await status_async(engine, config=ini)
            assert st.at_head and st.current_heads == ("r5",)
        finally:
            await engine.dispose()
        return actions

    assert asyncio.run(run()) == ["upgraded", "cached"]
    assert trace.bodies() == ALL_REVS


def test_fifty_tasks_and_five_processes(pg_url: str, make_ini: Any, trace: Any) -> None:
    """50 tasks of one loop and 5 other processes start at once: one migrates, every revision
    body runs once, all succeed."""
    ini = make_ini(pg_url)
    procs = [
        start_worker(ini, pg_url, env=worker_env(AUTOLOCK_TEST_SLEEP="0.05")) for _ in range(5)
    ]

    async def run() -> list[str]:
        engine = create_async_engine(async_url(pg_url, "postgresql+asyncpg"))
        coros = [ensure_migrated_async(engine, config=ini) for _ in range(50)]
        results = await _dispose_after(engine, asyncio.gather(*coros))
        return [r.action for r in results]

    actions = asyncio.run(run())
    outcomes = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outcomes
    upgraded = Counter(actions)["upgraded"] + sum('"upgraded"' in out for out in outcomes)
    assert upgraded == 1
    assert trace.bodies() == ALL_REVS


def test_event_loop_keeps_running_while_waiting_for_the_lock(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """A task waits for a lock another process holds: a 20 ms ticker of the same loop keeps
    ticking (the wait used to block the loop for up to 0.5 s at a time)."""
    ini = make_ini(pg_url)
    ticks: list[float] = []

    async def run() -> tuple[float, Any]:
        engine = create_async_engine(async_url(pg_url, "postgresql+asyncpg"))

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            result = await ensure_migrated_async(engine, config=ini, timeout=1.5)
        except Exception as exc:  # LockTimeout: the holder hangs for a minute
            result = exc
        task.cancel()
        await engine.dispose()
        return time.monotonic() - started, result

    with holder_hanging_in(ini, pg_url, trace, "r2"):
        waited, result = asyncio.run(run())
    assert type(result).__name__ == "LockTimeout"
    expected = waited / 0.02
    assert len(ticks) >= 0.5 * expected, (len(ticks), expected)


def test_fastapi_lifespan_and_starlette_startup(pg_url: str, make_ini: Any) -> None:
    """An app migrates from its FastAPI lifespan (and from a Starlette startup) with an
    AsyncEngine; its requests then see the schema."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    ini = make_ini(pg_url)
    url = async_url(pg_url, "postgresql+asyncpg")
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        engine = create_async_engine(url)
        seen.append((await ensure_migrated_async(engine, config=ini)).action)
        app.state.engine = engine
        yield
        await engine.dispose()

    api = FastAPI(lifespan=lifespan)

    @api.get("/count")
    async def count() -> dict[str, int]:
        async with api.state.engine.connect() as conn:
            return {"rows": (await conn.execute(text("SELECT count(*) FROM t1"))).scalar_one()}

    with TestClient(api) as client:
        assert client.get("/count").json() == {"rows": 1}

    @asynccontextmanager
    async def startup(app: Starlette) -> Any:  # Starlette 1.0 has only lifespans
        engine = create_async_engine(url)
        seen.append((await ensure_migrated_async(engine, config=ini)).action)
        await engine.dispose()
        yield

    async def home(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    star = Starlette(routes=[Route("/", home)], lifespan=startup)
    with TestClient(star) as client:
        assert client.get("/").json() == {"ok": True}
    assert seen == ["upgraded", "current"]


def test_install_on_an_async_engine(pg_url: str, make_ini: Any, trace: Any) -> None:
    """install(AsyncEngine): the first connections of 10 tasks migrate once, in the loop."""
    ini = make_ini(pg_url)

    async def run() -> list[int]:
        engine = create_async_engine(async_url(pg_url, "postgresql+asyncpg"))
        install(engine, config=ini)

        async def use() -> int:
            async with engine.connect() as conn:
                return int((await conn.execute(text("SELECT count(*) FROM t5"))).scalar_one())

        return await _dispose_after(engine, asyncio.gather(*[use() for _ in range(10)]))

    assert asyncio.run(run()) == [1] * 10
    assert trace.bodies() == ALL_REVS


def test_migration_lock_async_yields_a_fenced_async_connection(pg_url: str, make_ini: Any) -> None:
    """migration_lock_async(): an AsyncConnection named as the fenced migration session."""
    ini = make_ini(pg_url)

    async def run() -> str:
        engine = create_async_engine(async_url(pg_url, "postgresql+asyncpg"))
        async with migration_lock_async(engine, config=ini) as conn:
            name = (
                await conn.execute(text("SELECT current_setting('application_name')"))
            ).scalar_one()
            await conn.commit()
        await engine.dispose()
        return str(name)

    assert asyncio.run(run()).startswith("autolock:migrate:")


def test_sync_entry_points_refuse_an_async_engine(pg_url: str, make_ini: Any) -> None:
    """ensure_migrated(AsyncEngine) is a ConfigError that points at ensure_migrated_async."""
    engine = create_async_engine(async_url(pg_url, "postgresql+asyncpg"))
    with pytest.raises(ConfigError, match="ensure_migrated_async"):
        ensure_migrated(engine, config=make_ini(pg_url))  # type: ignore[arg-type]
    asyncio.run(engine.dispose())


def test_async_url_in_alembic_ini(
    pg_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str], trace: Any
) -> None:
    """postgresql+asyncpg:// in alembic.ini: `alembic-autolock check` exits 1 then 0, and the
    plain `alembic upgrade head` migrates through the hook, with no synchronous driver."""
    ini = make_ini(async_url(pg_url, "postgresql+asyncpg"))
    assert main(["-c", ini, "check"]) == 1
    assert capsys.readouterr().out.startswith("5 pending: r1")
    out = subprocess.run(
        [ALEMBIC, "-c", ini, "upgrade", "head"],
        capture_output=True,
        text=True,
        env=worker_env(AUTOLOCK_TEST_TRACE=str(trace.path)),
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert main(["-c", ini, "check"]) == 0
    assert heads_of(pg_url) == {"r5"}
    assert trace.bodies() == ALL_REVS


def test_lazy_install_in_ten_threads_and_ten_processes(
    pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """install() on a sync engine: the first connections of 10 threads and of 10 processes
    migrate once between them."""
    import threading

    ini = make_ini(pg_url)
    code = (
        "import sys\n"
        "from sqlalchemy import create_engine, text\n"
        "from alembic_autolock import install\n"
        f"engine = create_engine({pg_url!r})\n"
        f"install(engine, config={ini!r})\n"
        "with engine.connect() as conn:\n"
        "    print(conn.execute(text('SELECT count(*) FROM t5')).scalar_one())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=worker_env(AUTOLOCK_TEST_SLEEP="0.05"),
        )
        for _ in range(10)
    ]
    engine = make_engine(pg_url)
    install(engine, config=ini)
    counts: list[int] = []

    def use() -> None:
        with engine.connect() as conn:
            counts.append(int(conn.execute(text("SELECT count(*) FROM t5")).scalar_one()))

    threads = [threading.Thread(target=use) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, outs
    assert [o.strip() for o, _ in outs] == ["1"] * 10
    assert counts == [1] * 10
    assert trace.bodies() == ALL_REVS
    assert wait_for(lambda: heads_of(pg_url) == {"r5"}, 5)
