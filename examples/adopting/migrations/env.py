"""The project's env.py AFTER adopting alembic-autolock: the same URL logic and options, and
the whole online/offline body replaced by one call (compare migrations/env_before.py)."""

import os

from myproject.models import Base

from alembic import context
from alembic_autolock.env import run_migrations

url = os.environ.get("MYPROJECT_DB_URL")
if url:
    context.config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))


def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    return not (type_ == "table" and name.startswith("legacy_"))


# literal_binds and dialect_opts only mean something offline (--sql): used only there
run_migrations(
    target_metadata=Base.metadata,
    include_object=include_object,
    compare_type=True,
    literal_binds=True,
    dialect_opts={"paramstyle": "named"},
)
