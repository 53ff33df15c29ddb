"""Alembic's env.py, run by alembic_autolock: migrations take the migration lock, each revision
runs in its own transaction, and the application's loggers are left alone.

Settings (lock backend, timeout, version table ...) live in [alembic_autolock] in alembic.ini.
"""

from alembic_autolock.env import run_migrations

# Add your model's MetaData object here for 'autogenerate' support:
# from myapp.models import Base
# target_metadata = Base.metadata
target_metadata = None

run_migrations(target_metadata=target_metadata)
