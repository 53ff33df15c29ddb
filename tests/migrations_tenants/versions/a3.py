"""invoices

Revision ID: a3
Revises: a2
"""

import sqlalchemy as sa
import tenant_trace

from alembic import op

revision = "a3"
down_revision = "a2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tenant_trace.body(revision)
    op.create_table(
        "invoices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("invoices")
