"""`GET /admin/calls/{call_sid}`: the call as a person reads it, live while it is up."""

from __future__ import annotations

import datetime as dt
from typing import Any

from meterd.clock import Clock
from meterd.core.timeline import Timeline, agent_minutes, build_timeline
from meterd.services.errors import NotFound
from meterd.store import calls_store
from meterd.store.database import Database


class CallViewService:
    def __init__(
        self, database: Database, clock: Clock, *, increment_seconds: int, research_max_minutes: int
    ) -> None:
        self._database = database
        self._clock = clock
        self._increment_seconds = increment_seconds
        self._research_max_seconds = research_max_minutes * 60

    async def timeline(self, call_sid: str) -> tuple[Any, Timeline]:
        """The call's row and its timeline, open intervals counted up to now."""
        async with self._database.read() as connection:
            call = await calls_store.get_call(connection, call_sid)
            if call is None:
                raise NotFound(f"no call {call_sid}")
            events = await calls_store.conference_events(connection, call_sid)
            marks = await calls_store.marks(connection, call_sid)
            leg_end = await calls_store.customer_leg_end(connection, call_sid)
        if call.closed_by_sweeper and call.ended_at is not None:
            leg_end = call.ended_at if leg_end is None else min(leg_end, call.ended_at)
        timeline = build_timeline(
            events,
            marks,
            now_seconds=int(self._clock().timestamp()),
            research_max_seconds=self._research_max_seconds,
            call_ended_at_seconds=None if leg_end is None else int(leg_end.timestamp()),
        )
        return call, timeline

    async def view(self, call_sid: str) -> dict[str, Any]:
        call, timeline = await self.timeline(call_sid)
        return {
            "call_sid": call.call_sid,
            "account_id": call.account_id,
            "plan": call.plan,
            "status": call.status,
            "from": call.from_number,
            "started_at": call.started_at.isoformat(),
            "ended_at": call.ended_at and call.ended_at.isoformat(),
            "end_reason": call.end_reason,
            "closed_by_sweeper": bool(call.closed_by_sweeper),
            "hold_seconds": timeline.hold_seconds,
            "agents": {
                agent_id: {
                    "active_seconds": time.active_seconds,
                    "research_seconds": time.research_seconds,
                    "billable_seconds": time.billable_seconds,
                    "agent_minutes": agent_minutes(time.billable_seconds, self._increment_seconds),
                }
                for agent_id, time in timeline.agents.items()
            },
            "unlabelled_agents": list(timeline.unlabelled_agents),
            "charges": {
                "bank_minutes": 0,
                "deposit_minor": 0,
                "card_minor": 0,
                "incidents": 0,
                "waived": False,
            },
            "timeline": [
                {"at": _iso(entry.at_seconds), "event": entry.text} for entry in timeline.entries
            ],
        }


def _iso(epoch_seconds: int) -> str:
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).isoformat()
