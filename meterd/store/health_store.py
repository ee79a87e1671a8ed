"""The health check's question to the database (meterd/web/health.py)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select

from meterd.store.schema import calls
from meterd.store.transaction import Transaction


async def count_calls_by_status(connection: Transaction, statuses: Iterable[str]) -> dict[str, int]:
    """How many calls are in each of `statuses` (a status with none is left out)."""
    rows = await connection.execute(
        select(calls.c.status, func.count())
        .where(calls.c.status.in_(list(statuses)))
        .group_by(calls.c.status)
    )
    return {row[0]: row[1] for row in rows}
