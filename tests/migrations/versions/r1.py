"""table t1

Revision ID: r1
Revises: None
"""

import sqlalchemy as sa
from alembic import op

import autolock_test_behaviour as behaviour

revision = "r1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.body(revision)
    op.create_table("t1", sa.Column("id", sa.Integer, primary_key=True), sa.Column("note", sa.String(50)))
    behaviour.after_ddl(revision)
    op.execute(sa.text("INSERT INTO t1 (id, note) VALUES (1, 'r1')"))


def downgrade() -> None:
    behaviour.body(revision, "down")
    op.drop_table("t1")
