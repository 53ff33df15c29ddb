"""balances x100 in three batches, each committed on its own (autocommit_block: a backfill)

Revision ID: f2
Revises: f1
"""

from alembic import op

import faults_behaviour as behaviour

revision = "f2"
down_revision = "f1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    behaviour.begin(revision)
    behaviour.pause(revision, "start")  # inside the run's transaction, before the backfill
    with op.get_context().autocommit_block():
        for batch in range(3):
            behaviour.run(
                revision,
                f"UPDATE accounts SET balance = balance * 100 WHERE id % 3 = {batch}",
                f"batch{batch}",
            )
            behaviour.pause(revision, f"batch{batch}")


def downgrade() -> None:
    op.execute("UPDATE accounts SET balance = balance / 100")
