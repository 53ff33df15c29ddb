"""The shop's env.py: the whole body is one call."""

from alembic_autolock.env import run_migrations

run_migrations()
