"""table t5

Revision ID: r5
Revises: "r4"
"""

import sqlalchemy as sa
from alembic import op

import autolock_test_behaviour as behaviour

revision = "r5"
down_revision = "r4"
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.body(revision)
    op.create_table("t5", sa.Column("id", sa.Integer, primary_key=True), sa.Column("note", sa.String(50)))
    behaviour.after_ddl(revision)
    op.execute(sa.text("INSERT INTO t5 (id, note) VALUES (1, 'r5')"))


def downgrade() -> None:
    behaviour.body(revision, "down")
    op.drop_table("t5")
