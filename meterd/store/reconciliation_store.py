"""Reconciliation with Twilio's call records (meterd/services/reconciliation.py): meterd's calls
of a day, the agents among Twilio's callers, and the reports kept."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.store.schema import calls, reconciliations, webhook_events
from meterd.store.sql import upsert


async def calls_started(
    connection: AsyncConnection, start: dt.datetime, end: dt.datetime
) -> list[Any]:
    """meterd's calls that started in [start, end): call_sid, started_at, ended_at, status."""
    rows = await connection.execute(
        select(calls.c.call_sid, calls.c.started_at, calls.c.ended_at, calls.c.status)
        .where(calls.c.started_at >= start, calls.c.started_at < end)
        .order_by(calls.c.call_sid)
    )
    return list(rows.all())


async def participants_among(connection: AsyncConnection, sids: Sequence[str]) -> set[str]:
    """Which of these call sids meterd saw as a participant of a conference (an agent's leg)."""
    found: set[str] = set()
    for offset in range(0, len(sids), 500):  # bounded IN lists
        rows = await connection.scalars(
            select(webhook_events.c.participant_sid)
            .where(webhook_events.c.participant_sid.in_(list(sids[offset : offset + 500])))
            .distinct()
        )
        found.update(sid for sid in rows.all() if sid)
    return found


async def save(
    connection: AsyncConnection, day: dt.date, report_json: str, now: dt.datetime
) -> None:
    await connection.execute(
        upsert(
            connection,
            reconciliations,
            {"business_day": day, "report_json": report_json, "created_at": now},
            ["business_day"],
            ["report_json", "created_at"],
        )
    )


async def load(connection: AsyncConnection, day: dt.date) -> str | None:
    return await connection.scalar(
        select(reconciliations.c.report_json).where(reconciliations.c.business_day == day)
    )
