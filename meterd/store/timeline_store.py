"""A call's timeline, loaded from what is recorded for it: its conference events, the
terminal call-status callback of the customer's leg, and its research marks. The one place a
timeline is loaded (metering, settlement, the call view and the nightly usage all come here), so
they can never disagree about a call's time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.core.call_legs import TERMINAL_CALL_STATUSES
from meterd.core.timeline import ConferenceEvent, ResearchMark, Timeline, build_timeline
from meterd.store.schema import calls, research_marks, webhook_events


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


async def load_timeline(
    connection: AsyncConnection, call: Any, now: dt.datetime, research_max_seconds: int
) -> Timeline:
    """The call's timeline from everything recorded for it, open intervals counted to `now`.

    Conference time is Twilio's: what is open in the conference is counted to what Twilio's
    clock reads now, as far as the call's callbacks show it (`call_timeline`): at least the
    latest stamp it sent, and our `now` plus the lead its callbacks showed; research runs on our
    clock and is counted to `now`. So time Twilio has already told us of is never cut short by
    our clock lagging behind, and later minutes are not written late by Twilio's lead."""
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

    def built(
        sid: str, events: list[ConferenceEvent], leg_end: dt.datetime | None, lead_seconds: int
    ) -> Any:
        call = by_sid.pop(sid)
        at = now if now is not None else call.settled_at
        return call, call_timeline(
            call,
            events,
            research.get(sid, []),
            leg_end,
            at,
            research_max_seconds,
            twilio_lead_seconds=lead_seconds,
        )

    def timelines() -> Iterator[tuple[Any, Timeline]]:
        for sid, (events, leg_end, lead) in _by_call(rows):
            yield built(sid, events, leg_end, lead)
        for sid in list(by_sid):  # no event recorded
            yield built(sid, [], None, 0)

    return timelines()


def _by_call(
    rows: Iterable[Any],
) -> Iterator[tuple[str, tuple[list[ConferenceEvent], dt.datetime | None, int]]]:
    """Each call's conference events, the end of its customer's leg (the earliest terminal
    call-status) and how far ahead of our clock Twilio's was at least (a conference stamp
    minus when we received it, never below 0), from rows ordered with a call's together."""
    current: str | None = None
    events: list[ConferenceEvent] = []
    leg_end: dt.datetime | None = None
    lead = 0
    for sid, route, kind, sequence_number, event_at, participant, label, hold, received in rows:
        if sid != current:
            if current is not None:
                yield current, (events, leg_end, lead)
            current, events, leg_end, lead = sid, [], None, 0
        if event_at is None:
            continue
        if route == "conference":
            lead = max(lead, int((event_at - received).total_seconds()))
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
        yield current, (events, leg_end, lead)


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
        w.c.received_at,
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


def call_timeline(
    call: Any,
    events: list[ConferenceEvent],
    research: list[ResearchMark],
    leg_end: dt.datetime | None,
    now: dt.datetime,
    research_max_seconds: int,
    *,
    twilio_lead_seconds: int = 0,
) -> Timeline:
    """The timeline of `call` (its `call_sid`, `ended_at` and `closed_by_sweeper`) from its
    events, research marks and the end of the customer's leg, open intervals counted to `now`.

    Conference time runs on Twilio's clock, so its open intervals are counted to what Twilio's
    clock reads now, as far as the call's callbacks show it: at least their latest stamp, and
    at least `now` plus `twilio_lead_seconds`, the most a callback's stamp was ahead of our
    clock when we received it (never more than Twilio's lead, since a callback is received
    after its stamp; 0 when Twilio's clock is behind ours, whose time is then counted to our
    `now` and corrected at settlement). Research runs on our clock."""
    if call.closed_by_sweeper and call.ended_at is not None:
        leg_end = call.ended_at if leg_end is None else min(leg_end, call.ended_at)
    now_seconds = int(now.timestamp())
    twilio_now_seconds = max(
        [now_seconds + max(twilio_lead_seconds, 0), *(event.at_seconds for event in events)]
    )
    return build_timeline(
        events,
        research,
        now_seconds=twilio_now_seconds,
        research_now_seconds=now_seconds,
        research_max_seconds=research_max_seconds,
        call_ended_at_seconds=None if leg_end is None else int(leg_end.timestamp()),
        customer_call_sid=call.call_sid,
    )
