"""account plans

Revision ID: a2
Revises: a1
"""

import sqlalchemy as sa
import tenant_trace

from alembic import op

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = tenant_trace.body(revision)
    op.add_column("accounts", sa.Column("plan", sa.String(20), server_default="free"))
    tenant_trace.fail_here(revision, schema)


def downgrade() -> None:
    op.drop_column("accounts", "plan")
