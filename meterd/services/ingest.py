"""Recording Twilio's conference and call-status callbacks, each exactly once.

A conference callback is keyed by `ConferenceSid` + `SequenceNumber`, a call-status callback by
`CallSid` + `CallbackSource` + `SequenceNumber`, as Twilio guarantees them. The raw parameters
are stored in the same transaction as the event's effects (the call's conference sid, its end),
so a repeated delivery answers 2xx and changes nothing. Order never matters: the timeline is
rebuilt from the stored events, sorted by Twilio's sequence numbers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meterd.clock import Clock
from meterd.core.call_legs import TERMINAL_CALL_STATUSES
from meterd.logs import get_logger
from meterd.services.errors import InvalidRequest, InvariantBroken, NotFound
from meterd.services.twilio_fields import (
    check_webhook,
    parse_flag,
    parse_sequence_number,
    parse_timestamp,
    require_sid,
)
from meterd.store import calls_store
from meterd.store.calls_store import EventRecord
from meterd.store.database import Database

__all__ = [
    "FUTURE_EVENT_SECONDS_MAX",
    "IngestService",
    "Recorded",
    "parse_flag",
    "parse_sequence_number",
    "parse_timestamp",
]

log = get_logger("meterd.ingest")

STALE_SWEEP_BATCH_MAX = 500
FUTURE_EVENT_SECONDS_MAX = 24 * 3600
"""A Timestamp more than this ahead of meterd's clock (or `twilio_clock_skew_seconds_max`, if
larger) is refused. Real Twilio is never ahead by more than the clocks' skew, but the test suites
deliver a whole scripted call at once, its later events minutes ahead of the clock; a day still
bounds what a wrong clock can bill (the lower bound, the call's start, is the skew itself)."""


@dataclass(frozen=True)
class Recorded:
    call_sid: str
    new: bool  # False: a repeated delivery, nothing changed


class IngestService:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        *,
        stale_call_hours: int,
        clock_skew_seconds_max: int = 300,
    ) -> None:
        self._database = database
        self._clock = clock
        self._stale_call_hours = stale_call_hours
        self._clock_skew = dt.timedelta(seconds=clock_skew_seconds_max)
        self._future_max = dt.timedelta(
            seconds=max(clock_skew_seconds_max, FUTURE_EVENT_SECONDS_MAX)
        )

    async def conference_event(
        self,
        form: Mapping[str, str],
        params: list[tuple[str, str]],
        *,
        received_at: dt.datetime | None = None,
    ) -> Recorded:
        """Record one conference callback. `received_at`: when meterd took it, if earlier than
        now (a callback applied from the webhook journal)."""
        received_at = received_at or self._clock()
        check_webhook("conference", params)  # every field read below is well-formed
        conference_sid = require_sid(form.get("ConferenceSid"), "ConferenceSid", "CF")
        # meterd names the conference after the customer's CallSid
        call_sid = require_sid(form.get("FriendlyName"), "FriendlyName", "CA")
        kind = form["StatusCallbackEvent"]
        sequence_number = parse_sequence_number(form.get("SequenceNumber"))
        event_at = parse_timestamp(form.get("Timestamp"))
        participant_sid = form.get("CallSid") or None
        label = form.get("ParticipantLabel") or None
        hold = parse_flag(form.get("Hold"), "Hold")
        await self._check_within_call(call_sid, event_at, received_at, conference=True)
        async with self._database.write() as connection:
            noted = await calls_store.note_event(
                connection, call_sid, event_at, received_at, conference_sid=conference_sid
            )
            if not noted:
                raise NotFound(f"no call {call_sid}: the conference is not one of meterd's")
            new = await calls_store.record_event(
                connection,
                EventRecord(
                    dedup_key=f"conference:{conference_sid}:{sequence_number}",
                    route="conference",
                    call_sid=call_sid,
                    kind=kind,
                    params=params,
                    received_at=received_at,
                    sequence_number=sequence_number,
                    event_at=event_at,
                    participant_sid=participant_sid,
                    label=label,
                    hold=hold,
                ),
            )
            if not new:  # a repeated delivery: what note_event did changes nothing either
                return Recorded(call_sid, new=False)
            if kind == "conference-end":
                await calls_store.end_call(connection, call_sid, event_at, "conference-end")
        if (
            kind == "participant-join"
            and label != "customer"
            and not (label or "").startswith("agent:")
        ):
            log.warning(
                "unlabelled participant joined; counted as an agent under its CallSid",
                call_sid=call_sid,
                participant_sid=participant_sid,
                label=label,
            )
        return Recorded(call_sid, new=True)

    async def call_status(
        self,
        form: Mapping[str, str],
        params: list[tuple[str, str]],
        *,
        received_at: dt.datetime | None = None,
    ) -> Recorded:
        """Record one call-status callback; `received_at` as for `conference_event` (a status
        without a Timestamp happened when meterd took it, not when the journal applied it)."""
        check_webhook("call-status", params)  # every field read below is well-formed
        call_sid = require_sid(form.get("CallSid"), "CallSid", "CA")
        status = form["CallStatus"]
        source = form.get("CallbackSource", "call-progress-events")
        now = received_at or self._clock()
        if "SequenceNumber" in form:
            sequence_number: int | None = parse_sequence_number(form.get("SequenceNumber"))
            dedup_key = f"call:{call_sid}:{source}:{sequence_number}"
        else:  # the number's own status callback may come without one: one per status
            sequence_number = None
            dedup_key = f"call:{call_sid}:{source}:status:{status}"
        if form.get("Timestamp"):
            event_at = parse_timestamp(form["Timestamp"])
            await self._check_within_call(call_sid, event_at, now, conference=False)
        else:
            event_at = now
        async with self._database.write() as connection:
            if not await calls_store.note_event(connection, call_sid, event_at, now):
                raise NotFound(f"no call {call_sid}")
            new = await calls_store.record_event(
                connection,
                EventRecord(
                    dedup_key=dedup_key,
                    route="call-status",
                    call_sid=call_sid,
                    kind=status,
                    params=params,
                    received_at=now,
                    sequence_number=sequence_number,
                    event_at=event_at,
                ),
            )
            if not new:
                return Recorded(call_sid, new=False)
            if status in TERMINAL_CALL_STATUSES:
                await calls_store.end_call(connection, call_sid, event_at, f"call-{status}")
        return Recorded(call_sid, new=True)

    async def _check_within_call(
        self, call_sid: str, event_at: dt.datetime, received_at: dt.datetime, *, conference: bool
    ) -> None:
        """Refuse (400) an event Twilio stamped far outside its call's life: before meterd
        answered the call's voice webhook by more than the clocks' skew, or ahead of meterd's
        clock by more than `_future_max`. A timeline built from such a time would charge hours or
        years of minutes (issue 12, finding 0). Read before the write transaction: `started_at`
        never changes, and a refused event then never waits for the write lock."""
        async with self._database.read() as connection:
            call: Any = await calls_store.get_call(connection, call_sid)
        if call is None:
            where = ": the conference is not one of meterd's" if conference else ""
            raise NotFound(f"no call {call_sid}{where}")
        began = call.started_at
        if event_at < began - self._clock_skew:
            raise InvalidRequest(
                f"Timestamp {event_at.isoformat()} is before the call began "
                f"({began.isoformat()}, meterd's clock) by more than "
                f"twilio_clock_skew_seconds_max ({int(self._clock_skew.total_seconds())} s)"
            )
        if event_at > received_at + self._future_max:
            raise InvalidRequest(
                f"Timestamp {event_at.isoformat()} is ahead of meterd's clock "
                f"({received_at.isoformat()}) by more than "
                f"{int(self._future_max.total_seconds())} s"
            )

    async def close_stale_calls(self) -> int:
        """Close calls that heard nothing for `stale_call_hours` (an end event was lost); each
        is flagged in its view. Returns how many were closed."""
        now = self._clock()
        older_than = now - dt.timedelta(hours=self._stale_call_hours)
        async with self._database.write() as connection:
            stale = await calls_store.stale_calls(connection, older_than, STALE_SWEEP_BATCH_MAX)
            for call_sid in stale:
                call = await calls_store.get_call(connection, call_sid)
                if call is None:
                    raise InvariantBroken(f"stale call {call_sid} went away while closing it")
                await calls_store.end_call(
                    connection, call_sid, call.last_event_at, "stale: no end event", by_sweeper=True
                )
        for call_sid in stale:
            log.warning(
                "closed a call with no end event",
                call_sid=call_sid,
                stale_call_hours=self._stale_call_hours,
            )
        return len(stale)
