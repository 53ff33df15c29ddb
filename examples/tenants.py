"""Schema per tenant: one PostgreSQL database, one schema per customer, each migrated under its
own lock with its own version table (docs/tenants.md).

DATABASE_URL=postgresql://user:password@host/app python examples/tenants.py

It creates three tenant schemas if they are missing, migrates the first one alone (what an app
does when a customer signs up), then the whole fleet (what a deploy job does), and prints one
line per tenant. Run it twice: the second run only reads each schema's version table.
"""

import os
import sys

from sqlalchemy import create_engine, text

from alembic_autolock import ensure_migrated, migrate_schemas

CONFIG = os.path.join(os.path.dirname(__file__), "..", "alembic.ini")
TENANTS = ["acme", "globex", "initech"]

engine = create_engine(os.environ["DATABASE_URL"])

# Creating a tenant's schema is the application's job; the library refuses a missing one.
with engine.begin() as conn:
    quote = conn.dialect.identifier_preparer.quote_identifier
    for name in TENANTS:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote(name)}"))

# One tenant, e.g. at sign-up: its version table lives in its schema, its revisions run with
# that schema first on the search path, and its lock and cached answer are its own.
first = ensure_migrated(engine, config=CONFIG, schema=TENANTS[0])
print(f"{TENANTS[0]} alone: {first.action}, at {', '.join(first.heads)}")

# Every tenant, 4 at a time; a tenant that fails is reported and the others go on.
report = migrate_schemas(engine, TENANTS, config=CONFIG, parallel=4)
for entry in report.results:
    if entry.ok and entry.result is not None:
        applied = ", ".join(entry.result.applied) or "nothing"
        print(f"{entry.schema}: {entry.result.action} (applied {applied})")
    else:
        print(f"{entry.schema}: FAILED {entry.error_type}: {entry.error_message}")
print(f"{len(report)} tenants: {report.counts()}")
engine.dispose()
sys.exit(0 if report.ok else 1)
