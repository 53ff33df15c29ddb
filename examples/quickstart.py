"""The smallest app start: bring the database to head, then serve.

DATABASE_URL=postgresql://... python examples/quickstart.py
"""

import os

from sqlalchemy import create_engine

from alembic_autolock import ensure_migrated

engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///example.db"))
result = ensure_migrated(
    engine, config=os.path.join(os.path.dirname(__file__), "..", "alembic.ini")
)
print(f"{result.action}: applied {list(result.applied)}, database at {list(result.heads)}")
