"""The fault-injection history (tests/test_faults.py): the one-call env.py a user writes."""

from alembic_autolock.env import run_migrations

run_migrations()
