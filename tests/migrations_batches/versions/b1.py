"""accounts: 30 rows (ids 1-30) with balance 1

Revision ID: b1
Revises: None
"""

import sqlalchemy as sa
from alembic import op

import autolock_test_behaviour as behaviour

revision = "b1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.body(revision)
    accounts = op.create_table(
        "accounts", sa.Column("id", sa.Integer, primary_key=True), sa.Column("balance", sa.Integer)
    )
    op.bulk_insert(accounts, [{"id": i, "balance": 1} for i in range(1, 31)])


def downgrade() -> None:
    behaviour.body(revision, "down")
    op.drop_table("accounts")
