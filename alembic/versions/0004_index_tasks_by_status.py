"""index tasks by status and project

On PostgreSQL the index is built with CREATE INDEX CONCURRENTLY, which cannot run inside a
transaction: autocommit_block() commits what came before and runs it outside one. That works
because alembic_autolock hands Alembic a fresh connection and runs each revision in its own
transaction. Elsewhere it is a plain CREATE INDEX. (status comes first: an index that starts with
project_id would take over the foreign key's index on MySQL, and could then not be dropped.)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 12:03:00
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index(
                "ix_tasks_status_project",
                "tasks",
                ["status", "project_id"],
                postgresql_concurrently=True,
                if_not_exists=True,
            )
    else:
        op.create_index("ix_tasks_status_project", "tasks", ["status", "project_id"])


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.drop_index(
                "ix_tasks_status_project",
                table_name="tasks",
                postgresql_concurrently=True,
                if_exists=True,
            )
    else:
        op.drop_index("ix_tasks_status_project", table_name="tasks")
