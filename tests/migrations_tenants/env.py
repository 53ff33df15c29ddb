"""The tenant tests' migration environment: the same one-call env.py a user writes."""

from alembic_autolock.env import run_migrations

run_migrations()
