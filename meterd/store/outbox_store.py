"""Requests to Twilio's REST API, recorded first and sent after (meterd/services/outbox.py).

A request is recorded once per key (`INSERT ... ON CONFLICT DO NOTHING`); each attempt to send it
is claimed by moving its attempt count on from the count read, so two daemons never both send it.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update

from meterd.store.schema import outbox
from meterd.store.sql import insert_ignoring_conflict
from meterd.store.transaction import Record, Transaction


async def record_request(
    connection: Transaction,
    *,
    request_key: str,
    kind: str,
    call_sid: str,
    target_sid: str,
    argument: str,
    now: dt.datetime,
) -> bool:
    """Record a request once; True if it is new."""
    statement = insert_ignoring_conflict(
        connection,
        outbox,
        {
            "request_key": request_key,
            "kind": kind,
            "call_sid": call_sid,
            "target_sid": target_sid,
            "argument": argument,
            "created_at": now,
            "attempts": 0,
            "done_at": None,
            "failed_at": None,
            "last_error": None,
        },
        ["request_key"],
    ).returning(outbox.c.outbox_id)
    return (await connection.execute(statement)).scalar_one_or_none() is not None


async def pending_requests(connection: Transaction, limit: int) -> list[Record]:
    """Requests neither done nor failed, oldest first, at most `limit`."""
    rows = await connection.execute(
        select(outbox)
        .where(outbox.c.done_at.is_(None), outbox.c.failed_at.is_(None))
        .order_by(outbox.c.outbox_id)
        .limit(limit)
    )
    return list(rows.all())


async def claim_attempt(connection: Transaction, outbox_id: int, attempts_read: int) -> bool:
    """Count one more attempt, if the request is still as read (not done, `attempts_read`
    attempts); False if another daemon got there first."""
    claimed = await connection.execute(
        update(outbox)
        .where(
            outbox.c.outbox_id == outbox_id,
            outbox.c.attempts == attempts_read,
            outbox.c.done_at.is_(None),
        )
        .values(attempts=attempts_read + 1)
    )
    return claimed.rowcount == 1


async def mark_failed(
    connection: Transaction, outbox_id: int, failed_at: dt.datetime, error: str
) -> None:
    await connection.execute(
        update(outbox)
        .where(outbox.c.outbox_id == outbox_id)
        .values(failed_at=failed_at, last_error=error)
    )


async def mark_done(connection: Transaction, outbox_id: int, done_at: dt.datetime) -> None:
    await connection.execute(
        update(outbox).where(outbox.c.outbox_id == outbox_id).values(done_at=done_at)
    )
