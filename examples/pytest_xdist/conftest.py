"""Each test runs in a transaction on the run's migrated database, rolled back at its end.

migrated_engine (from alembic-autolock's pytest plugin) is an Engine on a database at head,
shared by every pytest-xdist worker of the run.
"""

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Connection, Engine


@pytest.fixture
def conn(migrated_engine: Engine) -> Iterator[Connection]:
    with migrated_engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()
