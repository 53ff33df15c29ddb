"""table t3

Revision ID: r3
Revises: "r2"
"""

import sqlalchemy as sa
from alembic import op

import autolock_test_behaviour as behaviour

revision = "r3"
down_revision = "r2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.body(revision)
    op.create_table("t3", sa.Column("id", sa.Integer, primary_key=True), sa.Column("note", sa.String(50)))
    behaviour.after_ddl(revision)
    op.execute(sa.text("INSERT INTO t3 (id, note) VALUES (1, 'r3')"))


def downgrade() -> None:
    behaviour.body(revision, "down")
    op.drop_table("t3")
