"""`GET /admin/calls/{call_sid}`: the call as a person reads it, live while it is up."""

from __future__ import annotations

import datetime as dt
from typing import Any

from meterd.clock import Clock
from meterd.core import ledger
from meterd.core.timeline import Timeline, agent_minutes
from meterd.services.errors import InvalidRequest, NotFound
from meterd.store import call_listing, calls_store, ledger_store, timeline_store
from meterd.store.database import Database
from meterd.store.transaction import Record, Transaction


class CallViewService:
    def __init__(
        self, database: Database, clock: Clock, *, increment_seconds: int, research_max_minutes: int
    ) -> None:
        self._database = database
        self._clock = clock
        self._increment_seconds = increment_seconds
        self._research_max_seconds = research_max_minutes * 60

    async def timeline(self, call_sid: str) -> tuple[Any, Timeline, dict[str, Any]]:
        """The call's row, its timeline (open intervals counted up to now) and its charges."""
        async with self._database.read() as connection:
            call = await calls_store.get_call(connection, call_sid)
            if call is None:
                raise NotFound(f"no call {call_sid}")
            return call, *await self._read(connection, call)

    async def _read(self, connection: Transaction, call: Record) -> tuple[Timeline, dict[str, Any]]:
        timeline = await timeline_store.load_timeline(
            connection, call, self._clock(), self._research_max_seconds
        )
        # what the call used (a card block bought during it is a purchase, not usage)
        totals = await ledger_store.call_book_totals(
            connection, call.call_sid, excluding_kinds=frozenset({"card_block", "card_refund"})
        )
        all_totals = await ledger_store.call_book_totals(connection, call.call_sid)
        incidents = await ledger_store.net_incidents(connection, call.call_sid)
        account_id = call.account_id or ""
        charges = {
            "bank_minutes": -totals.get(ledger.bank_book(account_id), 0),
            "deposit_minor": -totals.get(ledger.deposit_book(account_id), 0),
            "card_minor": -sum(
                total for book, total in all_totals.items() if book.endswith(":card_receipts")
            ),
            "owed_minor": -totals.get(ledger.receivable_book(account_id), 0),
            "incidents": incidents,
            "waived": call.waived_at is not None,
        }
        return timeline, charges

    async def list(
        self,
        *,
        ended: bool,
        account_id: str | None,
        since: dt.datetime | None,
        after_sid: str | None,
        limit: int,
    ) -> dict[str, Any]:
        """`GET /admin/calls`: a page of open (or ended) calls, each as `view` shows it without
        its timeline entries; `next_after` names the last call when more may follow."""
        async with self._database.read() as connection:
            try:
                rows = await call_listing.list_calls(
                    connection,
                    ended=ended,
                    account_id=account_id,
                    since=since,
                    after_sid=after_sid,
                    limit=limit,
                )
            except LookupError:
                raise InvalidRequest(
                    f"after names no call: {after_sid!r}; page with next_after"[:200]
                ) from None
            listed = []
            for call in rows:
                timeline, charges = await self._read(connection, call)
                summary = self._summary(call, timeline, charges)
                del summary["timeline"]
                listed.append(summary)
        return {
            "calls": listed,
            "next_after": rows[-1].call_sid if len(rows) == limit else None,
        }

    async def view(self, call_sid: str) -> dict[str, Any]:
        call, timeline, charges = await self.timeline(call_sid)
        return self._summary(call, timeline, charges)

    def _summary(self, call: Any, timeline: Timeline, charges: dict[str, Any]) -> dict[str, Any]:
        return {
            "call_sid": call.call_sid,
            "account_id": call.account_id,
            "plan": call.plan,
            "status": call.status,
            "from": call.from_number,
            "direction": call.direction,  # inbound, or outbound: a callback the desk placed
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
                    "accruing": time.accruing,
                }
                for agent_id, time in timeline.agents.items()
            },
            "unlabelled_agents": list(timeline.unlabelled_agents),
            "charges": charges,
            "settled_at": call.settled_at and call.settled_at.isoformat(),
            "pay_attempts": call.pay_attempts,
            "warned_at": call.warned_at and call.warned_at.isoformat(),
            "exhausted_at": call.exhausted_at and call.exhausted_at.isoformat(),
            "waiver_reason": call.waiver_reason,
            "incident": call.incident_group,
            "timeline": [
                {"at": _iso(entry.at_seconds), "event": entry.text} for entry in timeline.entries
            ],
        }


def _iso(epoch_seconds: int) -> str:
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).isoformat()
