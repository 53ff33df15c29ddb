"""users.email

Revision ID: a2
Revises: a1
"""

import sqlalchemy as sa

from alembic import op

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("email", sa.String(200), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "email")
