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


def upsert(
    connection: AsyncConnection,
    table: Table,
    values: dict[str, Any],
    conflict_columns: list[str],
    updated_columns: list[str],
) -> Any:
    """`INSERT ... ON CONFLICT (columns) DO UPDATE SET` the `updated_columns` to the new values,
    in the connection's dialect: one statement where a row may or may not exist yet."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**values)
    return statement.on_conflict_do_update(
        index_elements=conflict_columns,
        set_={column: statement.excluded[column] for column in updated_columns},
    )
