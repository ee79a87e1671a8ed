"""Calls, their recorded webhooks and research marks, in the database.

`record_event` claims a webhook's dedup key with `INSERT ... ON CONFLICT DO NOTHING` inside the
caller's transaction, so an event is stored exactly once and together with its effects.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Row, and_, bindparam, case, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.core.timeline import ResearchMark
from meterd.store.schema import (
    UtcDateTime,
    call_agent_minutes,
    calls,
    research_marks,
    webhook_events,
)
from meterd.store.sql import insert_ignoring_conflict, upsert


class CallStatus(StrEnum):
    """Where a call is. `menu`: answered, not yet connected (PIN, payment). `connected`: sent to
    its conference. `ended`: over (research may still be open). `rejected`: never connected."""

    MENU = "menu"
    CONNECTED = "connected"
    ENDED = "ended"
    REJECTED = "rejected"


@dataclass(frozen=True)
class EventRecord:
    dedup_key: str
    route: str
    call_sid: str
    kind: str
    params: Sequence[tuple[str, str]]
    received_at: dt.datetime
    sequence_number: int | None = None
    event_at: dt.datetime | None = None
    participant_sid: str | None = None
    label: str | None = None
    hold: bool | None = None


async def record_event(connection: AsyncConnection, event: EventRecord) -> bool:
    """Store the webhook once. True if it is new; False if it was recorded before."""
    statement = insert_ignoring_conflict(
        connection, webhook_events, _event_row(event), ["dedup_key"]
    ).returning(webhook_events.c.event_id)
    return (await connection.execute(statement)).scalar_one_or_none() is not None


def _event_row(event: EventRecord) -> dict[str, Any]:
    return {
        "dedup_key": event.dedup_key,
        "route": event.route,
        "call_sid": event.call_sid,
        "kind": event.kind,
        "sequence_number": event.sequence_number,
        "event_at": event.event_at,
        "participant_sid": event.participant_sid,
        "label": event.label,
        "hold": event.hold,
        "params_json": json.dumps(list(event.params)),
        "received_at": event.received_at,
    }


async def get_call(
    connection: AsyncConnection, call_sid: str, *, for_update: bool = False
) -> Row[Any] | None:
    query = select(calls).where(calls.c.call_sid == call_sid)
    if for_update and connection.dialect.name == "postgresql":
        query = query.with_for_update()
    return (await connection.execute(query)).one_or_none()


async def insert_call(
    connection: AsyncConnection, *, call_sid: str, from_number: str, now: dt.datetime
) -> None:
    await connection.execute(
        insert_ignoring_conflict(
            connection,
            calls,
            {
                "call_sid": call_sid,
                "account_id": None,
                "plan": None,
                "status": CallStatus.MENU,
                "from_number": from_number,
                "conference_sid": None,
                "pin_attempts": 0,
                "started_at": now,
                "ended_at": None,
                "end_reason": None,
                "closed_by_sweeper": False,
                "last_event_at": now,
            },
            ["call_sid"],
        )
    )


async def update_call(connection: AsyncConnection, call_sid: str, **values: Any) -> None:
    await connection.execute(update(calls).where(calls.c.call_sid == call_sid).values(**values))


async def end_call(
    connection: AsyncConnection,
    call_sid: str,
    ended_at: dt.datetime,
    reason: str,
    *,
    by_sweeper: bool = False,
) -> None:
    """Close the call at the earliest end we hear of (events may arrive out of order)."""
    row = await get_call(connection, call_sid, for_update=True)
    if row is None:
        return
    values: dict[str, Any] = {}
    if row.ended_at is None or ended_at < row.ended_at:
        values.update(ended_at=ended_at, end_reason=reason)
    if row.status in (CallStatus.MENU, CallStatus.CONNECTED):
        values["status"] = (
            CallStatus.ENDED if row.status == CallStatus.CONNECTED else CallStatus.REJECTED
        )
    if by_sweeper:
        values["closed_by_sweeper"] = True
    if values:
        await update_call(connection, call_sid, **values)


async def first_event_at(connection: AsyncConnection, call_sid: str) -> dt.datetime | None:
    """The earliest Twilio timestamp recorded for the call."""
    return cast(
        dt.datetime | None,
        await connection.scalar(
            select(func.min(webhook_events.c.event_at)).where(webhook_events.c.call_sid == call_sid)
        ),
    )


async def marks(connection: AsyncConnection, call_sid: str) -> list[ResearchMark]:
    rows = await connection.execute(
        select(research_marks.c.agent_id, research_marks.c.start_at, research_marks.c.end_at)
        .where(research_marks.c.call_sid == call_sid)
        .order_by(research_marks.c.mark_id)
    )
    return [
        ResearchMark(
            row.agent_id,
            int(row.start_at.timestamp()),
            None if row.end_at is None else int(row.end_at.timestamp()),
        )
        for row in rows
    ]


async def agents_with_late_research(
    connection: AsyncConnection, call_sids: Sequence[str], lateness: dt.timedelta
) -> set[tuple[str, str]]:
    """(call_sid, agent_id) of the agents with a research interval told to meterd more than
    `lateness` after it began (a retroactive interval: its time was known only once posted)."""
    rows = await connection.execute(
        select(
            research_marks.c.call_sid,
            research_marks.c.agent_id,
            research_marks.c.start_at,
            research_marks.c.created_at,
        ).where(research_marks.c.call_sid.in_(list(call_sids)))
    )
    return {(r.call_sid, r.agent_id) for r in rows if r.created_at > r.start_at + lateness}


async def open_mark(connection: AsyncConnection, call_sid: str, agent_id: str) -> Row[Any] | None:
    return (
        await connection.execute(
            select(research_marks).where(
                research_marks.c.call_sid == call_sid,
                research_marks.c.agent_id == agent_id,
                research_marks.c.end_at.is_(None),
            )
        )
    ).first()


async def research_open(
    connection: AsyncConnection, call_sid: str, now: dt.datetime, research_max: dt.timedelta
) -> bool:
    """Research on the call is open and below its limit (it still counts)."""
    return (
        await connection.execute(
            select(func.count()).where(
                research_marks.c.call_sid == call_sid,
                research_marks.c.end_at.is_(None),
                research_marks.c.start_at > now - research_max,
            )
        )
    ).scalar_one() > 0


async def add_mark(
    connection: AsyncConnection,
    call_sid: str,
    agent_id: str,
    start_at: dt.datetime,
    end_at: dt.datetime | None,
    now: dt.datetime,
) -> bool:
    """Add a research mark; False if the same (call, agent, start) is already recorded."""
    statement = insert_ignoring_conflict(
        connection,
        research_marks,
        {
            "call_sid": call_sid,
            "agent_id": agent_id,
            "start_at": start_at,
            "end_at": end_at,
            "created_at": now,
        },
        ["call_sid", "agent_id", "start_at"],
    ).returning(research_marks.c.mark_id)
    return (await connection.execute(statement)).scalar_one_or_none() is not None


async def close_mark(connection: AsyncConnection, mark_id: int, end_at: dt.datetime) -> None:
    await connection.execute(
        update(research_marks)
        .where(and_(research_marks.c.mark_id == mark_id, research_marks.c.end_at.is_(None)))
        .values(end_at=end_at)
    )


async def stale_calls(
    connection: AsyncConnection, older_than: dt.datetime, limit: int
) -> list[str]:
    return list(
        (
            await connection.scalars(
                select(calls.c.call_sid)
                .where(
                    calls.c.status.in_((CallStatus.MENU, CallStatus.CONNECTED)),
                    calls.c.last_event_at < older_than,
                )
                .order_by(calls.c.last_event_at)
                .limit(limit)
            )
        ).all()
    )


async def wake(connection: AsyncConnection, call_sid: str, now: dt.datetime) -> None:
    """Something changed the call's timeline: let the metering tick look at it now."""
    await connection.execute(
        update(calls)
        .where(calls.c.call_sid == call_sid, calls.c.settled_at.is_(None))
        .values(next_due_at=now)
    )


async def wake_account_calls(
    connection: AsyncConnection, account_id: str, now: dt.datetime
) -> None:
    """The account's funding changed (a card payment succeeded): let the metering tick look at
    each of its unsettled calls now (connected, or ended with research still running), unless
    it is due sooner. Rows are locked in call_sid order, skipping any another transaction holds
    (a call being metered or settled is being looked at already), so this never waits and never
    takes locks in an order other writers do not."""
    query = select(calls.c.call_sid).where(
        calls.c.account_id == account_id,
        calls.c.settled_at.is_(None),
        calls.c.status.in_((CallStatus.CONNECTED, CallStatus.ENDED)),
    )
    if connection.dialect.name == "postgresql":
        query = query.order_by(calls.c.call_sid.collate("C")).with_for_update(skip_locked=True)
    call_sids = list((await connection.scalars(query)).all())
    if not call_sids:
        return
    sooner = or_(calls.c.next_due_at.is_(None), calls.c.next_due_at > now)
    await connection.execute(
        update(calls).where(calls.c.call_sid.in_(call_sids), sooner).values(next_due_at=now)
    )


async def note_event(
    connection: AsyncConnection,
    call_sid: str,
    event_at: dt.datetime,
    now: dt.datetime,
    *,
    conference_sid: str | None = None,
) -> bool:
    """One statement for what every accepted callback does to its call: remember the latest
    Twilio time heard, the conference's sid, and wake the metering tick. False if there is no
    such call (then nothing was changed)."""
    values: dict[str, Any] = {
        "last_event_at": case(
            (calls.c.last_event_at < event_at, literal(event_at, UtcDateTime())),
            else_=calls.c.last_event_at,
        ),
        "next_due_at": case(
            (calls.c.settled_at.is_(None), literal(now, UtcDateTime())),
            else_=calls.c.next_due_at,
        ),
    }
    if conference_sid is not None:
        values["conference_sid"] = func.coalesce(calls.c.conference_sid, conference_sid)
    result = await connection.execute(
        update(calls).where(calls.c.call_sid == call_sid).values(**values)
    )
    return result.rowcount == 1


async def lock_call(connection: AsyncConnection, call_sid: str) -> Row[Any] | None:
    """The call's row, locked for metering or settling it (`FOR UPDATE SKIP LOCKED` on
    PostgreSQL: a call another daemon holds is skipped, None; SQLite's write transaction is
    exclusive already)."""
    return (await lock_calls(connection, [call_sid])).get(call_sid)


async def lock_calls(connection: AsyncConnection, call_sids: Sequence[str]) -> dict[str, Row[Any]]:
    """`lock_call` of each of a batch of calls, in one statement, locked in call_sid order (so
    two batches never wait on each other in a circle). A call another daemon holds is left out,
    as an unknown one is."""
    query = select(calls).where(calls.c.call_sid.in_(call_sids))
    if connection.dialect.name == "postgresql":  # byte order: Python's sorted() of the sids
        query = query.order_by(calls.c.call_sid.collate("C")).with_for_update(skip_locked=True)
    return {row.call_sid: row for row in await connection.execute(query)}


async def minutes_posted_of(
    connection: AsyncConnection, call_sids: Sequence[str]
) -> dict[str, dict[str, int]]:
    """`minutes_posted` of each of a batch of calls, in one statement (a call with none: {})."""
    found: dict[str, dict[str, int]] = {sid: {} for sid in call_sids}
    rows = await connection.execute(
        select(
            call_agent_minutes.c.call_sid,
            call_agent_minutes.c.agent_id,
            call_agent_minutes.c.minutes_posted,
        ).where(call_agent_minutes.c.call_sid.in_(call_sids))
    )
    for row in rows:
        found[row.call_sid][row.agent_id] = row.minutes_posted
    return found


async def minutes_posted(connection: AsyncConnection, call_sid: str) -> dict[str, int]:
    """How many minutes of each agent on the call the ledger holds (the "posted" marker)."""
    return (await minutes_posted_of(connection, [call_sid]))[call_sid]


async def set_minutes_posted(
    connection: AsyncConnection, call_sid: str, agent_id: str, minutes: int
) -> None:
    """Move the marker, in the transaction that posted (or gave back) the minutes."""
    await connection.execute(
        upsert(
            connection,
            call_agent_minutes,
            {"call_sid": call_sid, "agent_id": agent_id, "minutes_posted": minutes},
            ["call_sid", "agent_id"],
            ["minutes_posted"],
        )
    )


async def connect_from_menu(connection: AsyncConnection, call_sid: str, now: dt.datetime) -> bool:
    """Connect a caller still at the menu (paying); False if the call has moved on (hung up)."""
    result = await connection.execute(
        update(calls)
        .where(calls.c.call_sid == call_sid, calls.c.status == CallStatus.MENU)
        .values(status=CallStatus.CONNECTED, last_event_at=now)
    )
    return result.rowcount == 1


async def calls_refused_for_pin(
    connection: AsyncConnection, from_number: str, since: dt.datetime
) -> int:
    """Calls from `from_number` started after `since` that ended with no PIN recognised."""
    count = await connection.scalar(
        select(func.count())
        .select_from(calls)
        .where(
            calls.c.from_number == from_number,
            calls.c.end_reason == "pin_not_recognised",
            calls.c.started_at > since,
        )
    )
    return int(count or 0)


async def started_at_of(
    connection: AsyncConnection, call_sids: Sequence[str]
) -> dict[str, dt.datetime]:
    """When each of `call_sids` began (by meterd's clock), in one statement; a call meterd does
    not know is missing from the answer. For a batch of callbacks: `started_at` never changes."""
    if not call_sids:
        return {}
    rows = await connection.execute(
        select(calls.c.call_sid, calls.c.started_at).where(calls.c.call_sid.in_(call_sids))
    )
    return {row.call_sid: row.started_at for row in rows}


@dataclass(frozen=True)
class EventNote:
    """What `note_event` does to one call, for `note_events`: the latest Twilio time heard,
    when meterd heard it (the wake-up), the conference's sid if a callback named one."""

    call_sid: str
    event_at: dt.datetime
    now: dt.datetime
    conference_sid: str | None = None


async def note_events(connection: AsyncConnection, notes: Sequence[EventNote]) -> None:
    """`note_event` for several calls in one statement (executemany), in the order given: sort
    them by call so that two writers lock the calls' rows in one order. Calls that do not exist
    are not changed; the caller checked they do."""
    if not notes:
        return
    event_at = bindparam("b_event_at", type_=UtcDateTime())
    now = bindparam("b_now", type_=UtcDateTime())
    conference_sid = bindparam("b_conference_sid", type_=calls.c.conference_sid.type)
    statement = (
        update(calls)
        .where(calls.c.call_sid == bindparam("b_call_sid"))
        .values(
            last_event_at=case(
                (calls.c.last_event_at < event_at, event_at), else_=calls.c.last_event_at
            ),
            next_due_at=case((calls.c.settled_at.is_(None), now), else_=calls.c.next_due_at),
            conference_sid=func.coalesce(calls.c.conference_sid, conference_sid),
        )
    )
    await connection.execute(
        statement,
        [
            {
                "b_call_sid": note.call_sid,
                "b_event_at": note.event_at,
                "b_now": note.now,
                "b_conference_sid": note.conference_sid,
            }
            for note in notes
        ],
    )


async def record_events(connection: AsyncConnection, events: Sequence[EventRecord]) -> set[str]:
    """`record_event` for several webhooks in one statement (multi-row `INSERT ... ON CONFLICT
    DO NOTHING`): the dedup keys that were new. Give each key once."""
    if not events:
        return set()
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(webhook_events)
        .on_conflict_do_nothing(index_elements=["dedup_key"])
        .returning(webhook_events.c.dedup_key)
    )
    rows = [_event_row(event) for event in events]
    return set((await connection.execute(statement, rows)).scalars())
