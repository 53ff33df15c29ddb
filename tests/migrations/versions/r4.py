"""index on t1, concurrently on PostgreSQL (outside a transaction, through autocommit_block)

Revision ID: r4
Revises: r3
"""

from alembic import op

import autolock_test_behaviour as behaviour

revision = "r4"
down_revision = "r3"
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.body(revision)
    if op.get_context().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index("ix_t1_note", "t1", ["note"], postgresql_concurrently=True)
    else:
        op.create_index("ix_t1_note", "t1", ["note"])
    behaviour.after_ddl(revision)


def downgrade() -> None:
    behaviour.body(revision, "down")
    op.drop_index("ix_t1_note", table_name="t1")
