"""table t2

Revision ID: r2
Revises: "r1"
"""

import sqlalchemy as sa
from alembic import op

import autolock_test_behaviour as behaviour

revision = "r2"
down_revision = "r1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.body(revision)
    op.create_table("t2", sa.Column("id", sa.Integer, primary_key=True), sa.Column("note", sa.String(50)))
    behaviour.after_ddl(revision)
    op.execute(sa.text("INSERT INTO t2 (id, note) VALUES (1, 'r2')"))


def downgrade() -> None:
    behaviour.body(revision, "down")
    op.drop_table("t2")
