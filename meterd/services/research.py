"""Agents flag research time on a call: start/stop as it happens, or one interval afterwards.

Research is billable whether or not the caller is on hold, and may go on after the caller hung
up. Decisions where the rules are silent:
- start and stop take the server's clock (the agent's tool posts at that moment); a retroactive
  interval gives both ends in ISO 8601 with a UTC offset;
- research cannot start before the call began (the earlier of meterd answering it and the first
  Twilio timestamp recorded for it), end in the future, or last longer than
  `research_max_minutes`;
- after the call ended, research may start until the call is settled (`settle_delay_seconds`
  after its end, and not while research is open); a settled call's minutes are final (409);
- a second `start` while one is open, or a repeated identical interval, changes nothing (200);
  `stop` with nothing open is a 409.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from meterd.clock import Clock
from meterd.services import validation as v
from meterd.services.errors import Conflict, InvalidRequest, NotFound
from meterd.store import calls_store
from meterd.store.calls_store import CallStatus
from meterd.store.database import Database
from meterd.store.transaction import Record, Transaction

AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")
CLOCK_SKEW_SECONDS = 60  # an interval may end this far past our clock (agents' clocks drift)


def parse_instant(body: dict[str, Any], field: str) -> dt.datetime:
    value = body.get(field)
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{field} must be an ISO 8601 time with an offset, e.g. 2026-11-22T14:05:00Z"
        )
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{field} is not an ISO 8601 time: {value!r}"[:200]) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{field} needs a UTC offset (e.g. Z or +01:00): {value!r}"[:200])
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        raise InvalidRequest(f"{field} is out of range: {value!r}"[:200]) from None


@dataclass(frozen=True)
class _Request:
    """What an agent asked: `action` start or stop, or `interval` (research after the fact)."""

    call_sid: str
    agent_id: str
    action: str  # "start", "stop" or "interval"
    interval: tuple[dt.datetime, dt.datetime] | None = None


def _parse_request(body: Any) -> _Request:
    body = v.require_object(body)
    call_sid = v.required_text(body, "call_sid", max_chars=64)
    agent_id = v.required_text(body, "agent_id", pattern=AGENT_ID, max_chars=128)
    if "action" in body:
        v.only_fields(body, {"call_sid", "agent_id", "action"})
        action = body["action"]
        if action not in ("start", "stop"):
            raise InvalidRequest("action must be start or stop")
        return _Request(call_sid, agent_id, action)
    v.only_fields(body, {"call_sid", "agent_id", "start", "end"})
    if "start" not in body or "end" not in body:
        raise InvalidRequest("give either action (start or stop) or both start and end")
    interval = (parse_instant(body, "start"), parse_instant(body, "end"))
    return _Request(call_sid, agent_id, "interval", interval)


class ResearchService:
    def __init__(self, database: Database, clock: Clock, *, research_max_minutes: int) -> None:
        self._database = database
        self._clock = clock
        self._max = dt.timedelta(minutes=research_max_minutes)

    async def flag(self, body: Any) -> dict[str, Any]:
        request = _parse_request(body)
        call_sid, agent_id = request.call_sid, request.agent_id
        now = self._clock()
        async with self._database.write() as connection:
            call = _open_to_research(
                await calls_store.get_call(connection, call_sid, for_update=True), call_sid
            )
            if request.action == "start":
                outcome = await self._start(connection, call_sid, agent_id, now)
            elif request.action == "stop":
                outcome = await self._stop(connection, call_sid, agent_id, now)
            else:
                outcome = await self._record(connection, call, request, now)
            await calls_store.wake(connection, call_sid, now)
            marks = [
                m for m in await calls_store.marks(connection, call_sid) if m.agent_id == agent_id
            ]
        return {
            "call_sid": call_sid,
            "agent_id": agent_id,
            "outcome": outcome,
            "research": [
                {
                    "start": _iso(m.start_seconds),
                    "end": None if m.end_seconds is None else _iso(m.end_seconds),
                }
                for m in marks
            ],
        }

    async def _start(
        self, connection: Transaction, call_sid: str, agent_id: str, now: dt.datetime
    ) -> str:
        """Open research now, unless it is open already."""
        stale = await calls_store.open_mark(connection, call_sid, agent_id)
        if stale is not None and stale.start_at + self._max <= now:
            # it closed itself at the limit; record that, so a new one can start
            await calls_store.close_mark(connection, stale.mark_id, stale.start_at + self._max)
        if await calls_store.open_mark(connection, call_sid, agent_id) is None:
            await calls_store.add_mark(connection, call_sid, agent_id, now, None, now)
            return "started"
        return "already_started"

    async def _stop(
        self, connection: Transaction, call_sid: str, agent_id: str, now: dt.datetime
    ) -> str:
        """Close the open research now, or at its limit if that came first."""
        mark = await calls_store.open_mark(connection, call_sid, agent_id)
        if mark is None:
            raise Conflict(f"agent {agent_id} has no research in progress on {call_sid}")
        await calls_store.close_mark(connection, mark.mark_id, min(now, mark.start_at + self._max))
        return "stopped"

    async def _record(
        self, connection: Transaction, call: Record, request: _Request, now: dt.datetime
    ) -> str:
        """Record research given after the fact, once; the same interval again changes nothing."""
        call_sid, agent_id = request.call_sid, request.agent_id
        if request.interval is None:
            raise InvalidRequest("give start and end for research after the call")
        start, end = request.interval
        if end <= start:
            raise InvalidRequest("end must be after start")
        if end - start > self._max:
            raise InvalidRequest(f"a research interval may last at most {self._max}")
        first_event_at = await calls_store.first_event_at(connection, call_sid)
        call_began = min(call.started_at, first_event_at or call.started_at)
        if start < call_began:
            raise InvalidRequest("research cannot start before the call started")
        if end > now + dt.timedelta(seconds=CLOCK_SKEW_SECONDS):
            raise InvalidRequest("end is in the future")
        if await calls_store.add_mark(connection, call_sid, agent_id, start, end, now):
            return "recorded"
        if (int(start.timestamp()), int(end.timestamp())) in {
            (m.start_seconds, m.end_seconds)
            for m in await calls_store.marks(connection, call_sid)
            if m.agent_id == agent_id
        }:
            return "already_recorded"
        raise Conflict(
            f"agent {agent_id} already has research starting at "
            f"{start.isoformat()} on {call_sid} with another end"
        )


def _open_to_research(call: Record | None, call_sid: str) -> Record:
    """The call, if its research may change: it was connected, and is not settled yet."""
    if call is None:
        raise NotFound(f"no call {call_sid}")
    if call.status in (CallStatus.MENU, CallStatus.REJECTED):
        raise Conflict(f"call {call_sid} was never connected to an agent")
    if call.settled_at is not None:
        raise Conflict(f"call {call_sid} is settled; its minutes are final")
    return call


def _iso(epoch_seconds: int) -> str:
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).isoformat()
