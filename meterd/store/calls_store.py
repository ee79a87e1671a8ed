"""Calls, their recorded webhooks and research marks, in the database.

`record_event` claims a webhook's dedup key with `INSERT ... ON CONFLICT DO NOTHING` inside the
caller's transaction, so an event is stored exactly once and together with its effects.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Row, and_, case, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.core.timeline import ConferenceEvent, ResearchMark, Timeline, build_timeline
from meterd.store.schema import (
    UtcDateTime,
    call_agent_minutes,
    calls,
    research_marks,
    webhook_events,
)
from meterd.store.sql import insert_ignoring_conflict


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
        connection,
        webhook_events,
        {
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
        },
        ["dedup_key"],
    ).returning(webhook_events.c.event_id)
    return (await connection.execute(statement)).scalar_one_or_none() is not None


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


async def conference_events(connection: AsyncConnection, call_sid: str) -> list[ConferenceEvent]:
    rows = await connection.execute(
        select(
            webhook_events.c.sequence_number,
            webhook_events.c.event_at,
            webhook_events.c.kind,
            webhook_events.c.participant_sid,
            webhook_events.c.label,
            webhook_events.c.hold,
        ).where(webhook_events.c.call_sid == call_sid, webhook_events.c.route == "conference")
    )
    return [
        ConferenceEvent(
            sequence_number=row.sequence_number,
            at_seconds=int(row.event_at.timestamp()),
            kind=row.kind,
            call_sid=row.participant_sid or "",
            label=row.label or "",
            hold=row.hold,
        )
        for row in rows
    ]


async def first_event_at(connection: AsyncConnection, call_sid: str) -> dt.datetime | None:
    """The earliest Twilio timestamp recorded for the call."""
    return await connection.scalar(
        select(func.min(webhook_events.c.event_at)).where(webhook_events.c.call_sid == call_sid)
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
        await connection.scalar(
            select(func.count()).where(
                research_marks.c.call_sid == call_sid,
                research_marks.c.end_at.is_(None),
                research_marks.c.start_at > now - research_max,
            )
        )
    ) > 0


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


def params_of(raw_json: str) -> Mapping[str, str]:
    return dict(json.loads(raw_json))


# The call-status callbacks that end the customer's own leg.
TERMINAL_CALL_STATUSES = ("completed", "busy", "failed", "no-answer", "canceled")


async def load_timeline(
    connection: AsyncConnection, call: Row[Any], now: dt.datetime, research_max_seconds: int
) -> Timeline:
    """The call's timeline from everything recorded for it, open intervals counted to `now`.

    Conference time is Twilio's: its clock has reached at least the latest timestamp it sent,
    so what is open in the conference is counted to that stamp when it is ahead of our `now`
    (Twilio's clock running ahead of ours); research runs on our clock and is counted to `now`.
    So time Twilio has already told us of is never cut short by our clock lagging behind."""
    ((_, timeline),) = await load_timelines(connection, [call], research_max_seconds, now=now)
    return timeline


async def load_timelines(
    connection: AsyncConnection,
    calls_: Sequence[Any],
    research_max_seconds: int,
    *,
    now: dt.datetime | None = None,
) -> Iterator[tuple[Any, Timeline]]:
    """`load_timeline` of each of a batch of calls (rows with the `calls` columns `call_sid`,
    `ended_at`, `settled_at`, `closed_by_sweeper`): one query for their research marks, one for
    their events, however many calls. The one place a call's timeline is loaded.

    With `now`: from everything recorded, open intervals counted to `now`. Without: each call is
    settled and its timeline is the one its settlement built, from the events recorded (received)
    by its `settled_at`, open intervals counted to `settled_at`.

    Each call's timeline is built as the iterator reaches it (its events are read together), so
    a batch's timelines are never all held at once; every call of the batch is reached once."""
    by_sid = {call.call_sid: call for call in calls_}
    if not by_sid:
        return iter(())
    sids = list(by_sid)
    research = await _marks_of(connection, sids)
    rows = await connection.execute(_events_query(sids, up_to_settlement=now is None))

    def built(sid: str, events: list[ConferenceEvent], leg_end: dt.datetime | None) -> Any:
        call = by_sid.pop(sid)
        at = now if now is not None else call.settled_at
        return call, _timeline(
            call, events, research.get(sid, []), leg_end, at, research_max_seconds
        )

    def timelines() -> Iterator[tuple[Any, Timeline]]:
        current: str | None = None
        events: list[ConferenceEvent] = []
        leg_end: dt.datetime | None = None  # the customer's leg ended (terminal call-status)
        for sid, route, kind, sequence_number, event_at, participant, label, hold in rows:
            if sid != current:
                if current is not None:
                    yield built(current, events, leg_end)
                current, events, leg_end = sid, [], None
            if event_at is None:
                continue
            if route == "conference":
                events.append(
                    ConferenceEvent(
                        sequence_number,
                        int(event_at.timestamp()),
                        kind,
                        participant or "",
                        label or "",
                        hold,
                    )
                )
            elif leg_end is None or event_at < leg_end:
                leg_end = event_at
        if current is not None:
            yield built(current, events, leg_end)
        for sid in list(by_sid):  # no event recorded
            yield built(sid, [], None)

    return timelines()


async def _marks_of(
    connection: AsyncConnection, call_sids: Sequence[str]
) -> dict[str, list[ResearchMark]]:
    found: dict[str, list[ResearchMark]] = {}
    for sid, agent_id, start_at, end_at in await connection.execute(
        select(
            research_marks.c.call_sid,
            research_marks.c.agent_id,
            research_marks.c.start_at,
            research_marks.c.end_at,
        )
        .where(research_marks.c.call_sid.in_(call_sids))
        .order_by(research_marks.c.mark_id)
    ):
        found.setdefault(sid, []).append(
            ResearchMark(
                agent_id,
                int(start_at.timestamp()),
                None if end_at is None else int(end_at.timestamp()),
            )
        )
    return found


def _events_query(call_sids: Sequence[str], *, up_to_settlement: bool) -> Any:
    """The calls' conference events and the terminal call-status callbacks of their customer
    legs, a call's together; with `up_to_settlement`, only those received by its settlement."""
    w = webhook_events
    query = select(
        w.c.call_sid,
        w.c.route,
        w.c.kind,
        w.c.sequence_number,
        w.c.event_at,
        w.c.participant_sid,
        w.c.label,
        w.c.hold,
    )
    recorded = or_(
        w.c.route == "conference",
        and_(w.c.route == "call-status", w.c.kind.in_(TERMINAL_CALL_STATUSES)),
    )
    if up_to_settlement:
        query = query.select_from(w.join(calls, calls.c.call_sid == w.c.call_sid)).where(
            w.c.call_sid.in_(call_sids),
            calls.c.call_sid.in_(call_sids),  # else PostgreSQL hashes the whole calls table
            recorded,
            w.c.received_at <= calls.c.settled_at,
        )
    else:
        query = query.where(w.c.call_sid.in_(call_sids), recorded)
    return query.order_by(w.c.call_sid)  # any order, as long as a call's events come together


def _timeline(
    call: Any,
    events: list[ConferenceEvent],
    research: list[ResearchMark],
    leg_end: dt.datetime | None,
    now: dt.datetime,
    research_max_seconds: int,
) -> Timeline:
    if call.closed_by_sweeper and call.ended_at is not None:
        leg_end = call.ended_at if leg_end is None else min(leg_end, call.ended_at)
    now_seconds = int(now.timestamp())
    twilio_now_seconds = max([now_seconds, *(event.at_seconds for event in events)])
    return build_timeline(
        events,
        research,
        now_seconds=twilio_now_seconds,
        research_now_seconds=now_seconds,
        research_max_seconds=research_max_seconds,
        call_ended_at_seconds=None if leg_end is None else int(leg_end.timestamp()),
        customer_call_sid=call.call_sid,
    )


async def wake(connection: AsyncConnection, call_sid: str, now: dt.datetime) -> None:
    """Something changed the call's timeline: let the metering tick look at it now."""
    await connection.execute(
        update(calls)
        .where(calls.c.call_sid == call_sid, calls.c.settled_at.is_(None))
        .values(next_due_at=now)
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
    query = select(calls).where(calls.c.call_sid == call_sid)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return (await connection.execute(query)).one_or_none()


async def minutes_posted(connection: AsyncConnection, call_sid: str) -> dict[str, int]:
    """How many minutes of each agent on the call the ledger holds (the "posted" marker)."""
    rows = await connection.execute(
        select(call_agent_minutes.c.agent_id, call_agent_minutes.c.minutes_posted).where(
            call_agent_minutes.c.call_sid == call_sid
        )
    )
    return {row.agent_id: row.minutes_posted for row in rows}


async def set_minutes_posted(
    connection: AsyncConnection, call_sid: str, agent_id: str, minutes: int
) -> None:
    """Move the marker, in the transaction that posted (or gave back) the minutes."""
    await connection.execute(
        insert_ignoring_conflict(
            connection,
            call_agent_minutes,
            {"call_sid": call_sid, "agent_id": agent_id, "minutes_posted": 0},
            ["call_sid", "agent_id"],
        )
    )
    await connection.execute(
        update(call_agent_minutes)
        .where(call_agent_minutes.c.call_sid == call_sid, call_agent_minutes.c.agent_id == agent_id)
        .values(minutes_posted=minutes)
    )
