"""The application code under test: a few queries on the migrated schema."""

from sqlalchemy import text
from sqlalchemy.engine import Connection


def add_customer(conn: Connection, email: str) -> int:
    row = conn.execute(
        text("INSERT INTO customers (email) VALUES (:email) RETURNING id"), {"email": email}
    )
    return int(row.scalar_one())


def place_order(conn: Connection, customer_id: int, total_cents: int) -> int:
    row = conn.execute(
        text(
            "INSERT INTO orders (customer_id, total_cents) VALUES (:customer, :total) RETURNING id"
        ),
        {"customer": customer_id, "total": total_cents},
    )
    return int(row.scalar_one())


def open_orders(conn: Connection, customer_id: int) -> list[tuple[int, int, str]]:
    rows = conn.execute(
        text(
            "SELECT id, total_cents, status FROM orders "
            "WHERE customer_id = :customer AND status = 'placed' ORDER BY id"
        ),
        {"customer": customer_id},
    )
    return [(int(r.id), int(r.total_cents), str(r.status)) for r in rows]
