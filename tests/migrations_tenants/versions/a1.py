"""accounts

Revision ID: a1
Revises: None
"""

import sqlalchemy as sa
import tenant_trace

from alembic import op

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = tenant_trace.body(revision)
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
    )
    # the row names the schema the revision ran in: revisions never name a schema themselves
    op.execute(sa.text("INSERT INTO accounts (id, name) VALUES (1, :name)").bindparams(name=schema))


def downgrade() -> None:
    op.drop_table("accounts")
