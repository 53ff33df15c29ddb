"""The fault-injection history (tests/test_faults.py): the one-call env.py a user writes, with
the application's connection set-up (a statement_timeout, when the test asks for one)."""

import os

from sqlalchemy.engine import Connection

from alembic_autolock.env import run_migrations


def setup(connection: Connection) -> None:
    timeout = os.environ.get("AUTOLOCK_FAULT_STATEMENT_TIMEOUT")
    if timeout:
        connection.exec_driver_sql(f"SET statement_timeout = {int(timeout)}")


run_migrations(connection_setup=setup)
