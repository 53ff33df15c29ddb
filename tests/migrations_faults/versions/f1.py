"""accounts: 30 rows with balance 1 (a transactional revision where DDL is transactional)

Revision ID: f1
Revises: None
"""

import sqlalchemy as sa
from alembic import op

import faults_behaviour as behaviour

revision = "f1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.begin(revision)
    op.create_table(
        "accounts", sa.Column("id", sa.Integer, primary_key=True), sa.Column("balance", sa.Integer)
    )
    behaviour.trace("did", revision, "create")
    behaviour.pause(revision, "body")
    behaviour.run(
        revision,
        "INSERT INTO accounts (id, balance) "
        + " UNION ALL ".join(f"SELECT {i}, 1" for i in range(1, 31)),
        "insert",
    )


def downgrade() -> None:
    op.drop_table("accounts")
