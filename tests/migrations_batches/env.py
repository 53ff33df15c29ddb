"""A second history for the fence tests: the same one-call env.py a user writes."""

from alembic_autolock.env import run_migrations

run_migrations()
