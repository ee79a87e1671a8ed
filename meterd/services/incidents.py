"""Linking a per-incident follow-up call to an earlier incident, so both share its 2 hours.

Both calls must belong to the same account, the earlier one must be a per_incident call that
started within `incident_link_days` before the follow-up, and the follow-up must not be settled
yet (its charge is decided at settlement). Linking twice to the same incident changes nothing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from meterd.clock import Clock
from meterd.core.plans import Plan
from meterd.services import validation as v
from meterd.services.errors import Conflict, InvalidRequest, NotFound
from meterd.store import calls_store
from meterd.store.database import Database


class IncidentService:
    def __init__(self, database: Database, clock: Clock, *, link_days: int) -> None:
        self._database = database
        self._clock = clock
        self._window = dt.timedelta(days=link_days)

    async def link(self, body: Any) -> dict[str, Any]:
        body = v.require_object(body)
        v.only_fields(body, {"call_sid", "incident_call_sid"})
        call_sid = v.required_text(body, "call_sid", max_chars=64)
        incident_sid = v.required_text(body, "incident_call_sid", max_chars=64)
        if call_sid == incident_sid:
            raise InvalidRequest("a call cannot be linked to itself")
        async with self._database.write() as connection:
            call = await calls_store.get_call(connection, call_sid, for_update=True)
            earlier = await calls_store.get_call(connection, incident_sid)
            if call is None or earlier is None:
                raise NotFound(f"no call {call_sid if call is None else incident_sid}")
            if call.account_id is None or call.account_id != earlier.account_id:
                raise InvalidRequest("both calls must belong to the same account")
            if earlier.plan != Plan.PER_INCIDENT.value or call.plan != Plan.PER_INCIDENT.value:
                raise InvalidRequest("only per_incident calls share an incident")
            if not earlier.started_at <= call.started_at <= earlier.started_at + self._window:
                raise InvalidRequest(
                    f"the follow-up must start within {self._window.days} days "
                    f"after the incident's call"
                )
            group = earlier.incident_group or earlier.call_sid
            if call.incident_group == group:
                return {"call_sid": call_sid, "incident": group, "outcome": "already_linked"}
            if call.settled_at is not None:
                raise Conflict(f"call {call_sid} is settled; its charge is final")
            if call.incident_group is not None:
                raise Conflict(f"call {call_sid} is already linked to {call.incident_group}")
            await calls_store.update_call(connection, call_sid, incident_group=group)
        return {"call_sid": call_sid, "incident": group, "outcome": "linked"}
