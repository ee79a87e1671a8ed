"""Recording Twilio's conference and call-status callbacks, each exactly once.

A conference callback is keyed by `ConferenceSid` + `SequenceNumber`, a call-status callback by
`CallSid` + `CallbackSource` + `SequenceNumber`, as Twilio guarantees them. The raw parameters
are stored in the same transaction as the event's effects (the call's conference sid, its end),
so a repeated delivery answers 2xx and changes nothing. Order never matters: the timeline is
rebuilt from the stored events, sorted by Twilio's sequence numbers.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass

from meterd.clock import Clock
from meterd.logs import get_logger
from meterd.services.answering import call_sid_of
from meterd.services.errors import InvalidRequest, NotFound
from meterd.store import calls_store
from meterd.store.calls_store import EventRecord
from meterd.store.database import Database

log = get_logger("meterd.ingest")

TERMINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
STALE_SWEEP_BATCH_MAX = 500


@dataclass(frozen=True)
class Recorded:
    call_sid: str
    new: bool  # False: a repeated delivery, nothing changed


SEQUENCE_NUMBER = re.compile(r"^[0-9]{1,12}$")
PARTICIPANT_SID = re.compile(r"^[A-Z]{2}[0-9a-fA-F]{32}$")


def parse_timestamp(value: str | None, field: str = "Timestamp") -> dt.datetime:
    """Twilio's RFC 2822 timestamps (`Mon, 21 Dec 2020 15:19:52 +0000`; 1- or 2-digit days)."""
    if not value:
        raise InvalidRequest(f"{field} is missing")
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{field} is not an RFC 2822 time: {value!r}"[:200]) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{field} has no UTC offset: {value!r}"[:200])
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        raise InvalidRequest(f"{field} is out of range: {value!r}"[:200]) from None


def parse_sequence_number(value: str | None) -> int:
    if value is None or not SEQUENCE_NUMBER.match(value):
        raise InvalidRequest("SequenceNumber is missing or is not a whole number")
    return int(value)


def parse_flag(value: str | None, field: str) -> bool | None:
    if value is None or value == "":
        return None
    if value not in ("true", "false"):
        raise InvalidRequest(f"{field} must be true or false, got {value!r}"[:200])
    return value == "true"


class IngestService:
    def __init__(self, database: Database, clock: Clock, *, stale_call_hours: int) -> None:
        self._database = database
        self._clock = clock
        self._stale_call_hours = stale_call_hours

    async def conference_event(
        self, form: Mapping[str, str], params: list[tuple[str, str]]
    ) -> Recorded:
        conference_sid = form.get("ConferenceSid", "")
        if not conference_sid.startswith("CF") or len(conference_sid) > 64:
            raise InvalidRequest("ConferenceSid is missing or is not a conference sid")
        call_sid = form.get("FriendlyName", "")  # meterd names the conference after the CallSid
        kind = form.get("StatusCallbackEvent", "")
        if not kind or len(kind) > 64:
            raise InvalidRequest("StatusCallbackEvent is missing")
        sequence_number = parse_sequence_number(form.get("SequenceNumber"))
        event_at = parse_timestamp(form.get("Timestamp"))
        participant_sid = form.get("CallSid") or None
        if participant_sid is not None and not PARTICIPANT_SID.match(participant_sid):
            raise InvalidRequest("CallSid is not a Twilio call sid")
        label = form.get("ParticipantLabel") or None
        if label is not None and len(label) > 128:
            raise InvalidRequest("ParticipantLabel is longer than Twilio allows (128)")
        hold = parse_flag(form.get("Hold"), "Hold")
        async with self._database.write() as connection:
            noted = await calls_store.note_event(
                connection, call_sid, event_at, self._clock(), conference_sid=conference_sid
            )
            if not noted:
                raise NotFound(f"no call {call_sid[:64]!r}: the conference is not one of meterd's")
            new = await calls_store.record_event(
                connection,
                EventRecord(
                    dedup_key=f"conference:{conference_sid}:{sequence_number}",
                    route="conference",
                    call_sid=call_sid,
                    kind=kind,
                    params=params,
                    received_at=self._clock(),
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

    async def call_status(self, form: Mapping[str, str], params: list[tuple[str, str]]) -> Recorded:
        call_sid = call_sid_of(form)
        status = form.get("CallStatus", "")
        if not status or len(status) > 32:
            raise InvalidRequest("CallStatus is missing")
        source = form.get("CallbackSource", "call-progress-events")[:64]
        now = self._clock()
        if "SequenceNumber" in form:
            sequence_number: int | None = parse_sequence_number(form.get("SequenceNumber"))
            dedup_key = f"call:{call_sid}:{source}:{sequence_number}"
        else:  # the number's own status callback may come without one: one per status
            sequence_number = None
            dedup_key = f"call:{call_sid}:{source}:status:{status}"
        event_at = parse_timestamp(form["Timestamp"]) if form.get("Timestamp") else now
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

    async def close_stale_calls(self) -> int:
        """Close calls that heard nothing for `stale_call_hours` (an end event was lost); each
        is flagged in its view. Returns how many were closed."""
        now = self._clock()
        older_than = now - dt.timedelta(hours=self._stale_call_hours)
        async with self._database.write() as connection:
            stale = await calls_store.stale_calls(connection, older_than, STALE_SWEEP_BATCH_MAX)
            for call_sid in stale:
                call = await calls_store.get_call(connection, call_sid)
                assert call is not None
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
