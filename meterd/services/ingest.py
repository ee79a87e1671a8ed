"""Recording Twilio's conference and call-status callbacks, each exactly once.

A conference callback is keyed by `ConferenceSid` + `SequenceNumber`, a call-status callback by
`CallSid` + `CallbackSource` + `SequenceNumber`, as Twilio guarantees them. The raw parameters
are stored in the same transaction as the event's effects (the call's conference sid, its end),
so a repeated delivery answers 2xx and changes nothing. Order never matters: the timeline is
rebuilt from the stored events, sorted by Twilio's sequence numbers.

`record_batch` records many callbacks in one transaction (the group commit of
`meterd/services/ingest_writer.py`) in a few statements, with the outcome each would have had
alone: every refusal (an unknown call, a time outside the call) is decided before the batch
writes anything, so a refused callback leaves nothing of itself. (Checking first was measured
faster than a SAVEPOINT per callback, and lets the writes of the batch go in one statement each.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from meterd.clock import Clock
from meterd.core.call_legs import TERMINAL_CALL_STATUSES
from meterd.logs import get_logger
from meterd.services.errors import InvalidRequest, InvariantBroken, NotFound, ServiceError
from meterd.services.twilio_fields import (
    check_webhook,
    parse_flag,
    parse_sequence_number,
    parse_timestamp,
    require_sid,
)
from meterd.store import calls_store
from meterd.store.calls_store import EventNote, EventRecord
from meterd.store.database import Database
from meterd.store.transaction import Transaction

__all__ = [
    "FUTURE_EVENT_SECONDS_MAX",
    "Callback",
    "IngestService",
    "Outcome",
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


Outcome: TypeAlias = "Recorded | ServiceError"
"""What became of one callback of a batch: recorded, or refused (a 4xx) with nothing written."""


@dataclass(frozen=True)
class Callback:
    """A signed conference ("conference") or call-status ("call-status") callback, as meterd
    took it at `received_at`."""

    route: str
    form: Mapping[str, str]
    params: list[tuple[str, str]]
    received_at: dt.datetime


@dataclass(frozen=True)
class _Planned:
    """A callback read and checked for form; what recording it writes."""

    event: EventRecord
    event_at: dt.datetime
    timestamped: bool  # Twilio's Timestamp: checked against the call's life
    conference_sid: str | None
    end_reason: str | None  # the callback ends the call, for this reason
    unlabelled_join: bool


def _plan(callback: Callback) -> _Planned:
    if callback.route == "conference":
        return _plan_conference(callback)
    if callback.route == "call-status":
        return _plan_call_status(callback)
    raise ValueError(f"not a callback route: {callback.route!r}")


def _plan_conference(callback: Callback) -> _Planned:
    form, params = callback.form, callback.params
    check_webhook("conference", params)  # every field read below is well-formed
    conference_sid = require_sid(form.get("ConferenceSid"), "ConferenceSid", "CF")
    # meterd names the conference after the customer's CallSid
    call_sid = require_sid(form.get("FriendlyName"), "FriendlyName", "CA")
    kind = form["StatusCallbackEvent"]
    sequence_number = parse_sequence_number(form.get("SequenceNumber"))
    event_at = parse_timestamp(form.get("Timestamp"))
    label = form.get("ParticipantLabel") or None
    event = EventRecord(
        dedup_key=f"conference:{conference_sid}:{sequence_number}",
        route="conference",
        call_sid=call_sid,
        kind=kind,
        params=params,
        received_at=callback.received_at,
        sequence_number=sequence_number,
        event_at=event_at,
        participant_sid=form.get("CallSid") or None,
        label=label,
        hold=parse_flag(form.get("Hold"), "Hold"),
    )
    return _Planned(
        event,
        event_at,
        timestamped=True,
        conference_sid=conference_sid,
        end_reason="conference-end" if kind == "conference-end" else None,
        unlabelled_join=kind == "participant-join"
        and label != "customer"
        and not (label or "").startswith("agent:"),
    )


def _plan_call_status(callback: Callback) -> _Planned:
    form, params = callback.form, callback.params
    check_webhook("call-status", params)  # every field read below is well-formed
    call_sid = require_sid(form.get("CallSid"), "CallSid", "CA")
    status = form["CallStatus"]
    source = form.get("CallbackSource", "call-progress-events")
    if "SequenceNumber" in form:
        sequence_number: int | None = parse_sequence_number(form.get("SequenceNumber"))
        dedup_key = f"call:{call_sid}:{source}:{sequence_number}"
    else:  # the number's own status callback may come without one: one per status
        sequence_number = None
        dedup_key = f"call:{call_sid}:{source}:status:{status}"
    timestamped = bool(form.get("Timestamp"))
    # a status without a Timestamp happened when meterd took it
    event_at = parse_timestamp(form["Timestamp"]) if timestamped else callback.received_at
    event = EventRecord(
        dedup_key=dedup_key,
        route="call-status",
        call_sid=call_sid,
        kind=status,
        params=params,
        received_at=callback.received_at,
        sequence_number=sequence_number,
        event_at=event_at,
    )
    return _Planned(
        event,
        event_at,
        timestamped=timestamped,
        conference_sid=None,
        end_reason=f"call-{status}" if status in TERMINAL_CALL_STATUSES else None,
        unlabelled_join=False,
    )


def _notes(accepted: Sequence[tuple[int, _Planned]]) -> list[EventNote]:
    """One note per call (in the callbacks' order, sorted by call), folding what `note_event`
    would do for each of its callbacks in arrival order."""
    notes: dict[str, EventNote] = {}
    for _, plan in accepted:
        event, seen = plan.event, notes.get(plan.event.call_sid)
        if seen is None:
            notes[event.call_sid] = EventNote(
                event.call_sid, plan.event_at, event.received_at, plan.conference_sid
            )
        else:
            notes[event.call_sid] = EventNote(
                event.call_sid,
                max(seen.event_at, plan.event_at),
                event.received_at,
                seen.conference_sid or plan.conference_sid,
            )
    return list(notes.values())


def _recorded_or_raise(outcome: Outcome) -> Recorded:
    if isinstance(outcome, ServiceError):
        raise outcome
    return outcome


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
        """Record one conference callback in its own transaction. `received_at`: when meterd
        took it, if earlier than now (a callback applied from the webhook journal)."""
        callback = Callback("conference", form, params, received_at or self._clock())
        return _recorded_or_raise((await self.record_batch([callback]))[0])

    async def call_status(
        self,
        form: Mapping[str, str],
        params: list[tuple[str, str]],
        *,
        received_at: dt.datetime | None = None,
    ) -> Recorded:
        """Record one call-status callback; `received_at` as for `conference_event` (a status
        without a Timestamp happened when meterd took it, not when the journal applied it)."""
        callback = Callback("call-status", form, params, received_at or self._clock())
        return _recorded_or_raise((await self.record_batch([callback]))[0])

    async def record_batch(self, callbacks: Sequence[Callback]) -> list[Outcome]:
        """Record `callbacks` in one write transaction, committed once; each one's outcome in
        the same order: `Recorded`, or the `ServiceError` it was refused for (a 4xx), which
        wrote nothing of it and nothing else was refused for it. An error of the database
        itself (the commit) raises, and then nothing of the batch was recorded.

        The calls are written in the order of their sids, each call's callbacks in arrival
        order: two batches (two daemons on PostgreSQL) then lock the calls' rows in one order
        and never wait on each other in a circle. Callbacks of different calls touch different
        rows, so this order changes no outcome."""
        outcomes: list[Outcome | None] = [None] * len(callbacks)
        planned: list[tuple[int, _Planned]] = []
        for index, callback in enumerate(callbacks):
            try:
                planned.append((index, _plan(callback)))
            except ServiceError as refused:
                outcomes[index] = refused
        planned.sort(key=lambda item: item[1].event.call_sid)
        if planned:
            async with self._database.write() as connection:
                await self._record(connection, planned, outcomes)
        for index, plan in planned:
            if plan.unlabelled_join and isinstance(outcomes[index], Recorded):
                log.warning(
                    "unlabelled participant joined; counted as an agent under its CallSid",
                    call_sid=plan.event.call_sid,
                    participant_sid=plan.event.participant_sid,
                    label=plan.event.label,
                )
        return [outcome for outcome in outcomes if outcome is not None]

    async def _record(
        self,
        connection: Transaction,
        planned: Sequence[tuple[int, _Planned]],
        outcomes: list[Outcome | None],
    ) -> None:
        """The batch's writes, in a few statements whatever its size. Every refusal is decided
        before the first write, so a refused callback leaves nothing behind. What is written
        equals recording the accepted callbacks one by one in arrival order: each call's
        `note_event` effects folded into one (the latest Twilio time, the last wake-up, the
        first conference sid), each dedup key claimed by its first callback (a repeat in the
        same batch, like a repeat later, changes nothing), each new end applied in order."""
        started = await calls_store.started_at_of(
            connection, sorted({plan.event.call_sid for _, plan in planned})
        )
        accepted: list[tuple[int, _Planned]] = []
        for index, plan in planned:
            try:
                self._check(plan, started)
            except ServiceError as refused:
                outcomes[index] = refused
            else:
                accepted.append((index, plan))
        await calls_store.note_events(connection, _notes(accepted))
        claimed_by: dict[str, int] = {}
        for index, plan in accepted:
            claimed_by.setdefault(plan.event.dedup_key, index)
        inserted = await calls_store.record_events(
            connection,
            [plan.event for index, plan in accepted if claimed_by[plan.event.dedup_key] == index],
        )
        for index, plan in accepted:
            event = plan.event
            new = event.dedup_key in inserted and claimed_by[event.dedup_key] == index
            if new and plan.end_reason is not None:
                await calls_store.end_call(
                    connection, event.call_sid, plan.event_at, plan.end_reason
                )
            outcomes[index] = Recorded(event.call_sid, new=new)

    def _check(self, plan: _Planned, started: Mapping[str, dt.datetime]) -> None:
        """The call is meterd's, and a Timestamp lies within its life."""
        began = started.get(plan.event.call_sid)
        if began is None:
            where = ": the conference is not one of meterd's" if plan.conference_sid else ""
            raise NotFound(f"no call {plan.event.call_sid}{where}")
        if plan.timestamped:
            self._check_within_call(began, plan.event_at, plan.event.received_at)

    def _check_within_call(
        self, began: dt.datetime, event_at: dt.datetime, received_at: dt.datetime
    ) -> None:
        """Refuse (400) an event Twilio stamped far outside its call's life: before meterd
        answered the call's voice webhook by more than the clocks' skew, or ahead of meterd's
        clock by more than `_future_max`. A timeline built from such a time would charge hours or
        years of minutes (issue 12, finding 0)."""
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
