"""Callbacks the desk asked meterd to place (`meterd/services/callbacks.py`), in the database.

A callback is claimed by its client reference with `INSERT ... ON CONFLICT DO NOTHING`, so two
requests with one reference (a retry, two clicks, two daemons) make one callback."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.store.schema import callbacks
from meterd.store.sql import insert_ignoring_conflict


@dataclass(frozen=True)
class NewCallback:
    callback_id: str
    client_reference: str
    request_sha256: str  # of the request's fields: the same reference must mean the same request
    account_id: str
    agent_id: str
    to_number: str
    status: str


async def claim(connection: AsyncConnection, new: NewCallback, now: dt.datetime) -> bool:
    """Store the callback unless its client reference is taken; True if this one stored it."""
    result = await connection.execute(
        insert_ignoring_conflict(
            connection,
            callbacks,
            {
                "callback_id": new.callback_id,
                "client_reference": new.client_reference,
                "request_sha256": new.request_sha256,
                "account_id": new.account_id,
                "agent_id": new.agent_id,
                "to_number": new.to_number,
                "call_sid": None,
                "status": new.status,
                "reason": None,
                "requested_at": now,
                "updated_at": now,
            },
            ["client_reference"],
        )
    )
    return bool(result.rowcount)


async def by_reference(connection: AsyncConnection, client_reference: str) -> Row[Any] | None:
    return (
        await connection.execute(
            select(callbacks).where(callbacks.c.client_reference == client_reference)
        )
    ).one_or_none()


async def get_callback(
    connection: AsyncConnection, callback_id: str, *, for_update: bool = False
) -> Row[Any] | None:
    query = select(callbacks).where(callbacks.c.callback_id == callback_id)
    if for_update and connection.dialect.name == "postgresql":
        query = query.with_for_update()
    return (await connection.execute(query)).one_or_none()


async def of_call(connection: AsyncConnection, call_sid: str) -> Row[Any] | None:
    """The callback that placed this call, if one did."""
    return (
        await connection.execute(select(callbacks).where(callbacks.c.call_sid == call_sid))
    ).one_or_none()


async def update_callback(
    connection: AsyncConnection, callback_id: str, now: dt.datetime, **values: Any
) -> None:
    await connection.execute(
        update(callbacks)
        .where(callbacks.c.callback_id == callback_id)
        .values(updated_at=now, **values)
    )
