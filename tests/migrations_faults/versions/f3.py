"""audit table (transactional where DDL is)

Revision ID: f3
Revises: f2
"""

import sqlalchemy as sa
from alembic import op

import faults_behaviour as behaviour

revision = "f3"
down_revision = "f2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.begin(revision)
    behaviour.pause(revision, "body")
    op.create_table("audit", sa.Column("id", sa.Integer, primary_key=True))
    behaviour.trace("did", revision, "create")
    behaviour.run(revision, "INSERT INTO audit (id) VALUES (1)", "insert")
    behaviour.pause(revision, "end")


def downgrade() -> None:
    op.drop_table("audit")
