"""Waivers: an agent gives back every charge of a call, during or after it.

Within `waiver_days` of the call's end (or, while it is up, at any time), with a reason from the
configured list. Every charge is reversed by a compensating transaction: minutes back to the
bank, money back to the deposit (or off the receivable); nothing is deleted. The call is marked
waived: its later minutes are metered at no charge, it buys no more card payments, hears no
announcement and is not hung up on. Card money goes back through the gateway (`PaymentService.
give_back`): blocks bought on the call, captures and card-paid incidents are refunded,
authorisations released, payments not sent yet cancelled, and payments still in flight are given
back when they complete. The account ends exactly as if the call's charges had never been made.
A second waiver of the same call changes nothing.

A waiver of one call of a linked incident group gives back exactly the incidents posted on that
call; the other calls keep theirs, and the waived call's time no longer counts toward the
group's later incidents.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from meterd.clock import Clock
from meterd.services import validation as v
from meterd.services.alerts import AlertKind, AlertService
from meterd.services.errors import InvalidRequest, InvariantBroken, NotFound
from meterd.services.funding import lock_account
from meterd.services.payments import PaymentService
from meterd.services.research import AGENT_ID
from meterd.store import calls_store
from meterd.store.database import Database


class WaiverService:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        payments: PaymentService,
        *,
        reasons: list[str],
        waiver_days: int,
        alerts: AlertService | None = None,
    ) -> None:
        self._alerts = alerts
        self._database = database
        self._clock = clock
        self._payments = payments
        self._reasons = reasons
        self._window = dt.timedelta(days=waiver_days)

    async def waive(self, body: Any) -> dict[str, Any]:
        body = v.require_object(body)
        v.only_fields(body, {"call_sid", "agent_id", "reason"})
        call_sid = v.required_text(body, "call_sid", max_chars=64)
        agent_id = v.required_text(body, "agent_id", pattern=AGENT_ID, max_chars=128)
        reason = v.required_text(body, "reason", max_chars=64)
        if reason not in self._reasons:
            raise InvalidRequest(f"reason must be one of: {', '.join(self._reasons)}")
        now = self._clock()
        async with self._database.write() as connection:
            call = await calls_store.get_call(connection, call_sid, for_update=True)
            if call is None:
                raise NotFound(f"no call {call_sid}")
            if call.ended_at is not None and now > call.ended_at + self._window:
                raise InvalidRequest(
                    f"the waiver window ({self._window.days} days after the call) has passed"
                )
            already = call.waived_at is not None
            if not already:
                await calls_store.update_call(
                    connection,
                    call_sid,
                    waived_at=now,
                    waiver_reason=f"{reason} (agent {agent_id})",
                )
            reversed_count = 0
            if call.account_id is not None:
                await lock_account(connection, call.account_id)
                waived = await calls_store.get_call(connection, call_sid)
                if waived is None:
                    raise InvariantBroken(f"call {call_sid} went away while waiving it")
                reversed_count = await self._payments.give_back(connection, waived)
                if not already and self._alerts is not None:
                    data: dict[str, object] = {"call_sid": call_sid, "reason": reason}
                    data |= {"agent_id": agent_id, "charges_reversed": reversed_count}
                    await self._alerts.record(
                        connection, AlertKind.CALL_WAIVED, call.account_id, call_sid, data, now
                    )
        return {
            "call_sid": call_sid,
            "waived": True,
            "reason": reason,
            "outcome": "already_waived" if already else "waived",
            "charges_reversed": reversed_count,
        }
