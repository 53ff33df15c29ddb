"""FastAPI with an AsyncEngine: the schema is brought to head in the lifespan, before the first
request, without blocking the event loop while another worker holds the lock.

    DATABASE_URL=postgresql://user@host/db uvicorn --workers 4 examples.fastapi_app:app

``DATABASE_URL`` may name the sync driver (``postgresql://``); the async one (asyncpg) is used.
Every worker runs the lifespan: one migrates, the others wait and go on. ``GET /tasks`` reads a
table the migrations create; ``GET /migrations/status`` is the readiness endpoint (200 at head).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from alembic_autolock import ensure_migrated_async
from alembic_autolock.web import make_asgi_app

CONFIG = str(Path(__file__).resolve().parent.parent / "alembic.ini")
url = make_url(os.environ["DATABASE_URL"])
if url.get_backend_name() == "postgresql":
    url = url.set(drivername="postgresql+asyncpg")
engine = create_async_engine(url)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    result = await ensure_migrated_async(engine, config=CONFIG)
    app.state.migration = result
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)
app.mount("/migrations", make_asgi_app(engine, config=CONFIG))


@app.get("/tasks")
async def tasks() -> dict[str, object]:
    async with engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM tasks"))).scalar_one()
    return {"tasks": count, "migration": app.state.migration.action}
