"""add accounts.display_name, filled from the email's local part

A schema change and a data migration in one revision: the new column is added, existing rows
are backfilled by one UPDATE (written per dialect, so it also renders in --sql mode), then the
column becomes NOT NULL.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 12:04:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

accounts = sa.table(
    "accounts",
    sa.column("id", sa.Integer),
    sa.column("email", sa.String),
    sa.column("display_name", sa.String),
)


def _local_part(dialect: str) -> sa.ColumnElement[str]:
    email = accounts.c.email
    if dialect == "postgresql":
        return sa.func.split_part(email, "@", 1)
    if dialect in ("mysql", "mariadb"):
        return sa.func.substring_index(email, "@", 1)
    return sa.func.substr(email, 1, sa.func.instr(email, "@") - 1)


def upgrade() -> None:
    op.add_column("accounts", sa.Column("display_name", sa.String(100), nullable=True))
    dialect = op.get_context().dialect.name
    op.execute(accounts.update().values(display_name=sa.func.coalesce(_local_part(dialect), "")))
    if dialect == "sqlite":  # SQLite rebuilds the table; copy_from spares reflection (--sql)
        with op.batch_alter_table("accounts", copy_from=_sqlite_accounts(nullable=True)) as b:
            b.alter_column("display_name", existing_type=sa.String(100), nullable=False)
    else:
        op.alter_column("accounts", "display_name", existing_type=sa.String(100), nullable=False)


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        with op.batch_alter_table("accounts", copy_from=_sqlite_accounts(nullable=False)) as b:
            b.drop_column("display_name")
    else:
        op.drop_column("accounts", "display_name")


def _sqlite_accounts(*, nullable: bool) -> sa.Table:
    return sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(255), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("display_name", sa.String(100), nullable=nullable),
    )
