"""Settlement's last word on a per-minute call's banked minutes against the account's other
calls (`core/bank_shares.py`): when two calls of one account ran at once and a late Twilio
event made one call's minute fall due before a minute of the other that the bank paid, the
minute due first takes the banked minute and the later one its payer (owed or on debt), at
the rate in force when it fell due.

Only calls that are settled trade (their timelines are final; an open call's minutes are
still moving and its own settlement comes later), and only minutes under the key they were
first posted under (settlement has not moved them yet). A minute due in research time told to
meterd after it began (a retroactive interval) is left where it is: it could be paid only once
meterd knew of it, so its due moment does not place it in the order."""

from __future__ import annotations

import datetime as dt

from meterd.core import ledger, rating
from meterd.core.bank_shares import TakenMinute, bank_trades
from meterd.core.timeline import Timeline
from meterd.logs import get_logger
from meterd.services.rates import RateBook, RateKind
from meterd.services.rebooking import booked_again, load_minute, unbooked
from meterd.store import calls_store, ledger_store, timeline_store
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.settlement")

# research told to meterd later than this after it began was not known while it ran
RESEARCH_LATE = dt.timedelta(seconds=2)
_TRADED_KINDS = frozenset(
    {
        ledger.TransactionKind.MINUTE_BANK,
        ledger.TransactionKind.MINUTE_RECEIVABLE,
        ledger.TransactionKind.MINUTE_DEBT,
    }
)


class BankShares:
    """Settlement step: trade banked minutes between the settling call and the account's
    settled calls that ran with it, inside settlement's transaction, under the account lock."""

    def __init__(
        self, rates: RateBook, *, increment_seconds: int, research_max_seconds: int
    ) -> None:
        self._rates = rates
        self._increment_seconds = increment_seconds
        self._research_max_seconds = research_max_seconds

    async def apply(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        timeline: Timeline,
        now: dt.datetime,
    ) -> None:
        if call.waived_at is not None:
            return
        listed = await _minutes_since(connection, account, call.started_at)
        others = {m.call_sid or "" for m in listed} - {call.call_sid}
        if not others or call.call_sid not in {m.call_sid for m in listed}:
            return  # most settlements: no other call's minute since this call began
        calls = {call.call_sid: call}
        for sid in sorted(others):
            other = await calls_store.get_call(connection, sid)
            if other is not None and other.settled_at is not None and other.waived_at is None:
                calls[sid] = other
        if len(calls) == 1:
            return
        began = min(row.started_at for row in calls.values())
        if began < call.started_at:  # the other calls' minutes from their own start
            listed = await _minutes_since(connection, account, began)
        listed = [m for m in listed if m.call_sid in calls]
        timelines = {call.call_sid: timeline}
        others_rows = [row for sid, row in calls.items() if sid != call.call_sid]
        for row, other_timeline in await timeline_store.load_timelines(
            connection, others_rows, self._research_max_seconds, now=now
        ):
            timelines[row.call_sid] = other_timeline
        late = await calls_store.agents_with_late_research(connection, list(calls), RESEARCH_LATE)
        taken = []
        for m in listed:
            agent_id, n = ledger.parse_minute_key(m.key)
            due_seconds = self._due_seconds(timelines.get(m.call_sid or ""), agent_id, n)
            if due_seconds is not None and (m.call_sid, agent_id) not in late:
                banked = m.kind == ledger.TransactionKind.MINUTE_BANK
                taken.append(TakenMinute(m.key, m.call_sid or "", due_seconds, banked))
        for paid, owed in bank_trades(taken, call.call_sid):
            await self._trade(connection, calls, account, paid, owed, now)

    def _due_seconds(self, timeline: Timeline | None, agent_id: str, n: int) -> int | None:
        time = None if timeline is None else timeline.agents.get(agent_id)
        if time is None:
            return None
        return rating.minute_due_at_seconds(time.billable, n, self._increment_seconds)

    async def _trade(
        self,
        connection: Transaction,
        calls: dict[str, Record],
        account: Record,
        paid: TakenMinute,
        owed: TakenMinute,
        now: dt.datetime,
    ) -> None:
        """`owed` is paid from the bank; `paid` takes `owed`'s payer at its own due rate."""
        unpaid = await load_minute(connection, owed.key)
        source = ledger.minute_source(unpaid.kind).value
        due_at = dt.datetime.fromtimestamp(paid.due_seconds, dt.UTC)
        price = await self._rates.rate_at(
            connection, RateKind.PER_AGENT_MINUTE, account.currency, due_at
        )
        log.info(
            "settlement gave a banked minute to the call's minute that fell due first",
            banked_minute_key=owed.key,
            unbanked_minute_key=paid.key,
            source=source,
            price_minor=price,
        )
        banked = await load_minute(connection, paid.key)
        # both given back first, so the bank never holds a minute while one is owed
        await ledger_store.post(connection, unbooked(banked, source), now)
        await ledger_store.post(connection, unbooked(unpaid, "bank"), now)
        again = booked_again(calls[owed.call_sid], unpaid, source="bank", currency="", price=0)
        await ledger_store.post(connection, again, now)
        again = booked_again(
            calls[paid.call_sid], banked, source=source, currency=account.currency, price=price
        )
        await ledger_store.post(connection, again, now)


async def _minutes_since(
    connection: Transaction, account: Record, since: dt.datetime
) -> list[ledger_store.Listed]:
    """The account's banked, owed and debt minutes posted since `since` that settlement has
    not moved (under the key they were first posted under)."""
    return [
        m
        for m in await ledger_store.account_transactions(
            connection, account.account_id, _TRADED_KINDS, posted_since=since
        )
        if m.call_sid is not None and m.key == ledger.live_minute_key(m.key)
    ]
