"""`GET /admin/calls`: which calls are open or ended, a page at a time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.store.schema import calls


async def list_calls(
    connection: AsyncConnection,
    *,
    ended: bool,
    account_id: str | None,
    since: dt.datetime | None,
    after_sid: str | None,
    limit: int,
) -> Sequence[Row[Any]]:
    """Calls still open (no end yet) or ended, oldest start first (then by sid), of one
    account if given, started (open) or ended (ended) at or after `since`, after the call
    `after_sid` in that order (the last of the previous page; raises LookupError if there is no
    such call)."""
    query = select(calls).where(
        calls.c.ended_at.is_not(None) if ended else calls.c.ended_at.is_(None)
    )
    if account_id is not None:
        query = query.where(calls.c.account_id == account_id)
    if since is not None:
        query = query.where((calls.c.ended_at if ended else calls.c.started_at) >= since)
    if after_sid is not None:
        after = (
            await connection.execute(
                select(calls.c.started_at).where(calls.c.call_sid == after_sid)
            )
        ).scalar_one_or_none()
        if after is None:
            raise LookupError(after_sid)
        query = query.where(
            or_(
                calls.c.started_at > after,
                and_(calls.c.started_at == after, calls.c.call_sid > after_sid),
            )
        )
    query = query.order_by(calls.c.started_at, calls.c.call_sid).limit(limit)
    return (await connection.execute(query)).all()
