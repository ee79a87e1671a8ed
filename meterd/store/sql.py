"""Small SQL helpers that differ between SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


def insert_ignoring_conflict(
    connection: AsyncConnection, table: Table, values: dict[str, Any], conflict_columns: list[str]
) -> Any:
    """`INSERT ... ON CONFLICT (columns) DO NOTHING` in the connection's dialect: the way every
    idempotency key and dedup key is claimed."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return (
        dialect.insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=conflict_columns)
    )
