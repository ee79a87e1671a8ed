"""Settlement's last word on a per-minute call's minutes against the account's other calls
(`core/call_shares.py`): when two calls of one account ran at once and a late Twilio event made
one call's minute fall due before a minute of the other that the bank (or the deposit) paid,
the minute due first takes that payer and the later one its payer, each at the rate in force
when it fell due. The bank's minutes trade first (with owed and debt minutes), then the
deposit's (with owed ones); a deposit trade is not made when the deposit cannot hold it (the
rate rose) or money was paid into the deposit between the two minutes' due moments.

Only calls that are settled trade (their timelines are final; an open call's minutes are
still moving and its own settlement comes later), and only minutes under the key they were
first posted under (settlement has not moved them yet). A minute due in research time told to
meterd after it began (a retroactive interval) is left where it is: it could be paid only once
meterd knew of it, so its due moment does not place it in the order."""

from __future__ import annotations

import dataclasses
import datetime as dt

from meterd.core import ledger, rating
from meterd.core.call_shares import TRADES, Payer, TakenMinute, payer_trades
from meterd.core.timeline import Timeline
from meterd.logs import get_logger
from meterd.services.rates import RateBook, RateKind
from meterd.services.rebooking import booked_again, load_minute, unbooked
from meterd.store import calls_store, ledger_store, timeline_store
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.settlement")

# research told to meterd later than this after it began was not known while it ran
RESEARCH_LATE = dt.timedelta(seconds=2)
_PAYER_BY_KIND = {
    ledger.TransactionKind.MINUTE_BANK: Payer.BANK,
    ledger.TransactionKind.MINUTE_DEPOSIT: Payer.DEPOSIT,
    ledger.TransactionKind.MINUTE_RECEIVABLE: Payer.RECEIVABLE,
    ledger.TransactionKind.MINUTE_DEBT: Payer.DEBT,
}
_TRADED_KINDS = frozenset(_PAYER_BY_KIND)


class CallShares:
    """Settlement step: trade the bank's and the deposit's minutes between the settling call
    and the account's settled calls that ran with it, inside settlement's transaction, under
    the account lock."""

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
        taken: dict[str, TakenMinute] = {}
        for m in listed:
            agent_id, n = ledger.parse_minute_key(m.key)
            due_seconds = self._due_seconds(timelines.get(m.call_sid or ""), agent_id, n)
            if due_seconds is not None and (m.call_sid, agent_id) not in late:
                payer = _PAYER_BY_KIND[ledger.TransactionKind(m.kind)]
                taken[m.key] = TakenMinute(m.key, m.call_sid or "", due_seconds, payer)
        refilled = {Payer.DEPOSIT: await _deposits_since(connection, account, began)}
        for better, worse in TRADES:
            for paid, unpaid in payer_trades(
                list(taken.values()), call.call_sid, better, worse, refilled.get(better, ())
            ):
                traded = await self._trade(connection, calls, account, paid, unpaid, now)
                if traded is not None:
                    del taken[paid.key], taken[unpaid.key]
                    taken |= {m.key: m for m in traded}

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
        unpaid: TakenMinute,
        now: dt.datetime,
    ) -> tuple[TakenMinute, TakenMinute] | None:
        """`unpaid` is paid by `paid`'s payer, `paid` by `unpaid`'s, each at the rate when it
        fell due. Both as settlement sees them afterwards, or None if the deposit cannot hold
        the trade (nothing is posted then)."""
        paid_minute = await load_minute(connection, paid.key)
        unpaid_minute = await load_minute(connection, unpaid.key)
        postings = [
            # both given back first, so the bank never holds a minute while one is owed
            unbooked(paid_minute, unpaid.payer.value),
            unbooked(unpaid_minute, paid.payer.value),
            await self._booked_again(connection, calls, account, unpaid, unpaid_minute, paid.payer),
            await self._booked_again(connection, calls, account, paid, paid_minute, unpaid.payer),
        ]
        deposit_book = ledger.deposit_book(account.account_id)
        if Payer.DEPOSIT in (paid.payer, unpaid.payer):
            held = (await ledger_store.balances(connection, [deposit_book])).get(deposit_book, 0)
            moved = sum(p.amount for t in postings for p in t.postings if p.book == deposit_book)
            if held + moved < 0:
                log.info(
                    "settlement left two calls' minutes as they were: the deposit cannot hold "
                    "the trade",
                    earlier_minute_key=unpaid.key,
                    later_minute_key=paid.key,
                    deposit_minor=held,
                )
                return None
        log.info(
            "settlement gave the call's minute that fell due first the better payer",
            earlier_minute_key=unpaid.key,
            later_minute_key=paid.key,
            payer=paid.payer.value,
            later_payer=unpaid.payer.value,
        )
        for posting in postings:
            await ledger_store.post(connection, posting, now)
        return (
            dataclasses.replace(unpaid, key=postings[2].key, payer=paid.payer),
            dataclasses.replace(paid, key=postings[3].key, payer=unpaid.payer),
        )

    async def _booked_again(
        self,
        connection: Transaction,
        calls: dict[str, Record],
        account: Record,
        minute: TakenMinute,
        original: ledger.Transaction,
        payer: Payer,
    ) -> ledger.Transaction:
        """`minute` posted again, paid by `payer` at the rate in force when it fell due."""
        price = 0
        if payer != Payer.BANK:
            due_at = dt.datetime.fromtimestamp(minute.due_seconds, dt.UTC)
            price = await self._rates.rate_at(
                connection, RateKind.PER_AGENT_MINUTE, account.currency, due_at
            )
        return booked_again(
            calls[minute.call_sid],
            original,
            source=payer.value,
            currency="" if payer == Payer.BANK else account.currency,
            price=price,
        )


async def _deposits_since(
    connection: Transaction, account: Record, since: dt.datetime
) -> list[int]:
    """When money was paid into the account's deposit since `since` (epoch seconds)."""
    kinds = frozenset({ledger.TransactionKind.DEPOSIT})
    paid_in = await ledger_store.account_transactions(
        connection, account.account_id, kinds, posted_since=since
    )
    return [int(t.posted_at.timestamp()) for t in paid_in]


async def _minutes_since(
    connection: Transaction, account: Record, since: dt.datetime
) -> list[ledger_store.Listed]:
    """The account's banked, deposit-paid, owed and debt minutes posted since `since` that
    settlement has not moved (under the key they were first posted under)."""
    return [
        m
        for m in await ledger_store.account_transactions(
            connection, account.account_id, _TRADED_KINDS, posted_since=since
        )
        if m.call_sid is not None and m.key == ledger.live_minute_key(m.key)
    ]
