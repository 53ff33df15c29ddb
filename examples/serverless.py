"""A serverless handler (AWS Lambda, Google Cloud Functions, Azure Functions): the lazy path.

The engine is built when the module is imported (once per cold start); ``install(engine)``
makes its first connection run ``ensure_migrated`` once. A warm invocation pays one attribute
check. When a hundred functions start cold at once, one migrates and the others wait for it.

Give the function a ``timeout`` setting below its own time limit, and mark long revisions
``autolock_manual = True`` (or set ``time_budget``) so that no cold start is killed half-way
through a migration: see docs/safe-revisions.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from alembic_autolock import install

CONFIG = str(Path(__file__).resolve().parent.parent / "alembic.ini")

# NullPool: a frozen function keeps no idle connection open (and install() needs a second
# connection while the first one is being opened, which a pool of exactly one cannot give)
engine = create_engine(os.environ["DATABASE_URL"], poolclass=NullPool)
install(engine, config=CONFIG, timeout=20)


def handler(event: dict[str, Any], context: object = None) -> dict[str, Any]:
    """Count the tasks of a project; the first call of a cold start brings the schema to head."""
    with engine.connect() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM tasks WHERE project_id = :p"), {"p": event["project"]}
        ).scalar_one()
    return {"statusCode": 200, "body": {"project": event["project"], "tasks": count}}
