"""balances x100, in three committed batches (outside a transaction, like a large backfill)

Revision ID: b2
Revises: b1
"""

from alembic import op

import autolock_test_behaviour as behaviour

revision = "b2"
down_revision = "b1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.body(revision)
    with op.get_context().autocommit_block():
        for batch in range(3):
            op.execute(f"UPDATE accounts SET balance = balance * 100 WHERE mod(id, 3) = {batch}")
            behaviour.trace(revision, "up", f"batch{batch}")  # after the batch committed
            behaviour.pause(revision, f"batch{batch}")


def downgrade() -> None:
    behaviour.body(revision, "down")
    op.execute("UPDATE accounts SET balance = balance / 100")
