"""Tests of the shop's queries, spread over the workers: each sees the schema at head."""

import pytest
import shop
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine


def test_the_schema_is_at_head(migrated_engine: Engine) -> None:
    columns = {c["name"] for c in inspect(migrated_engine).get_columns("orders")}
    assert columns == {"id", "customer_id", "total_cents", "status"}


@pytest.mark.parametrize("n", range(12))
def test_a_placed_order_is_open(conn: Connection, n: int) -> None:
    customer = shop.add_customer(conn, f"buyer{n}@example.com")
    order = shop.place_order(conn, customer, 100 * (n + 1))
    assert shop.open_orders(conn, customer) == [(order, 100 * (n + 1), "placed")]


def test_a_customer_without_orders_has_none_open(conn: Connection) -> None:
    customer = shop.add_customer(conn, "window-shopper@example.com")
    assert shop.open_orders(conn, customer) == []
