"""How settlement pays a per-minute call's minutes in the funding order (docs/billing.md,
Settlement step 3). Live, each minute was paid from what the account held when meterd took it;
the final timeline can move a minute's due moment, give back a banked minute that held the bank,
and a block bought ahead of need pays bank first. Settlement rebooks (reverses, then posts again
under a suffixed key, `ledger.minute(..., rebooked=|repriced=)`) the minutes whose payer or price
the funding order decides otherwise, in this order:

1. a money minute taken before its final due moment is priced at the rate then;
2. money minutes the bank should have paid (a banked minute given back held it; a minute
   nothing could pay and those the deposit paid after it) are moved onto the bank;
3. the call's banked minutes that a block bought ahead of need paid while the deposit held
   their price (the account's minutes after it walked in the funding order) are moved onto
   the deposit;
4. a minute still owed is paid from the deposit if it holds its price;
5. authorise mode: a minute still owed or on debt is paid from the call's authorisations if
   they hold its price (the authorisation was bought because of it, and was on its way); the
   deposit money a debt minute gives back, or a deposit-paid minute the final timeline does not
   support, pays the later card minutes it would have paid.
"""

from __future__ import annotations

import datetime as dt

from meterd.core import ledger, rating
from meterd.core.timeline import Timeline
from meterd.logs import get_logger
from meterd.services.funding import FundingAuthority
from meterd.services.given_back import GivenBack
from meterd.services.rates import RateBook, RateKind
from meterd.services.rebooking import load_minute, rebook
from meterd.store import ledger_store
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.settlement")


class FundingOrder:
    """Settlement's rebookings of a per-minute call's minutes, inside its transaction, under
    the call's and the account's locks."""

    def __init__(
        self, rates: RateBook, funding: FundingAuthority, *, increment_seconds: int
    ) -> None:
        self._rates = rates
        self._funding = funding
        self._increment_seconds = increment_seconds

    async def apply(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        timeline: Timeline,
        given_back: GivenBack,
        now: dt.datetime,
    ) -> None:
        """Steps 1 to 5 of the module's docstring. `given_back`: the minutes settlement gave
        back (the final timeline does not support them)."""
        await self._price_at_final_due(connection, call, account, timeline, now)
        await self._pay_from_bank_first(connection, call, given_back.bank_ids, now)
        await self._pay_from_the_deposit_before_an_early_block(
            connection, call, account, timeline, now
        )
        await self._pay_owed_from_the_deposit(connection, call, account, now)
        await self._pay_unpaid_from_the_card(
            connection, call, account, given_back.deposit_minutes, now
        )

    async def _price_at_final_due(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        timeline: Timeline,
        now: dt.datetime,
    ) -> None:
        """A minute's price is the rate in force when it fell due. Live, meterd may take a
        minute before the moment its final timeline says it fell due: it counted open
        conference time to its own clock, Twilio's leave event took that time back, and a
        retroactive research interval made the minute up again, later. Such a minute (posted
        before its final due moment) is rebooked at the rate in force at that moment, from the
        payer it had if that payer can pay the new price (`rating.repriced_source`). A minute
        posted at or after its final due moment keeps its price: a correction that moves its
        moment earlier does not re-price it."""
        revenue_book = ledger.usage_revenue_book(account.currency)
        for key in await ledger_store.unreversed_keys(
            connection, call.call_sid, ledger.MONEY_MINUTE_KINDS
        ):
            # None is not reached: settlement gave back the minutes nothing supports
            due_at = self._final_due_at(timeline, key)
            if due_at is None or due_at <= await ledger_store.posted_at(connection, key):
                continue
            price = await self._rate_at(connection, account, due_at)
            original = await load_minute(connection, key)
            old_price = sum(p.amount for p in original.postings if p.book == revenue_book)
            if price == old_price:
                continue
            source = await self._funding.fund_repriced_minute(
                connection,
                account,
                call.call_sid,
                ledger.minute_source(original.kind),
                old_price_minor=old_price,
                new_price_minor=price,
                now=now,
            )
            log.info(
                "settlement priced a minute taken early at its final due moment",
                call_sid=call.call_sid,
                minute_key=key,
                price_minor=price,
                live_price_minor=old_price,
            )
            await rebook(
                connection,
                call,
                original,
                source=source.value,
                currency=account.currency,
                price=price,
                now=now,
                repriced=True,
            )

    async def _pay_from_bank_first(
        self,
        connection: Transaction,
        call: Record,
        bank_returned: list[int],
        now: dt.datetime,
    ) -> None:
        """Live, a minute may have been paid with money while the bank was empty only because
        an earlier minute, taken on a late leave event, held a banked minute that settlement
        has just given back. The final word follows the funding order: each such money-paid
        minute (posted after a given-back banked minute, matched one to one) is rebooked onto
        the bank, while the bank holds minutes. A money-paid minute posted before any of them
        rightly paid from the deposit and stays."""
        bank_book = ledger.bank_book(call.account_id)
        bank = (await ledger_store.balances(connection, [bank_book])).get(bank_book, 0)
        if bank <= 0:
            return
        held_back = sorted(bank_returned)
        onto_bank: list[str] = []
        for paid_id, key in await _in_live_order(
            connection, call.call_sid, ledger.MONEY_MINUTE_KINDS
        ):
            if held_back and held_back[0] < paid_id and len(onto_bank) < bank:
                held_back.pop(0)
                onto_bank.append(key)
        # minutes nothing could pay when they fell due (owed, or debt) are paid from the bank
        # once it holds minutes again, e.g. the block bought because they could not be paid
        kinds = ledger.TransactionKind
        unpaid = [
            key
            for _, key in await _in_live_order(
                connection, call.call_sid, frozenset({kinds.MINUTE_RECEIVABLE, kinds.MINUTE_DEBT})
            )
        ]
        for key in unpaid:
            if key not in onto_bank and len(onto_bank) < bank:
                onto_bank.append(key)
        # In the funding order, the block such a minute needed was bought when it fell due, and
        # the bank paid first from then on: a minute the deposit paid after it (live, the block
        # was still on its way; a cheaper minute posted in the same tick) is the bank's too.
        first_unpaid = [key for key in unpaid if key in onto_bank][:1]
        if first_unpaid:
            after_id = await _live_order(connection, first_unpaid[0])
            for paid_id, key in await _in_live_order(
                connection, call.call_sid, frozenset({kinds.MINUTE_DEPOSIT})
            ):
                if key not in onto_bank and len(onto_bank) < bank and paid_id > after_id:
                    onto_bank.append(key)
        for key in onto_bank:
            original = await load_minute(connection, key)
            await rebook(connection, call, original, source="bank", currency="", price=0, now=now)

    async def _pay_from_the_deposit_before_an_early_block(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        timeline: Timeline,
        now: dt.datetime,
    ) -> None:
        """meterd buys a block once bank and deposit cannot pay the next minute of every
        accruing agent: with two agents on the line, while the deposit still holds a minute.
        The block lands in the bank, the bank pays first, and the deposit's money is left over,
        where the funding order (bank, deposit, then card) would have spent it first.

        So the account's first block since the call began that was bought while the deposit
        held a minute at the rate then is replayed in the funding order: the account's minutes
        the bank paid after it (every call's, in posting order) are paid first from the minutes
        the bank held without the block, then from the deposit money there was when the block
        came, while it holds each one's price, until the first it cannot pay (there the block
        was needed). Minutes settlement already moved onto the deposit this way count as paid
        from that money. Of the minutes it pays, this call's are rebooked onto the deposit now
        (their banked minutes back to the bank), never more than the deposit holds; another
        call's are left to that call's settlement (a call settled already keeps its minutes)."""
        if call.waived_at is not None:
            return
        block = await self._first_early_block(connection, call, account)
        if block is None:
            return
        bank = await _booked_before(connection, account.account_id, "bank", block)
        budget = await _booked_before(connection, account.account_id, "deposit", block)
        held = await ledger_store.balances(connection, [ledger.deposit_book(account.account_id)])
        room = held.get(ledger.deposit_book(account.account_id), 0)
        for minute in await _minutes_after(connection, account.account_id, block):
            if minute.key.endswith(ledger.REBOOKED_FROM_DEPOSIT_SUFFIX):
                budget -= _price(await load_minute(connection, minute.key), account.currency)
                continue
            if minute.kind != ledger.TransactionKind.MINUTE_BANK:
                return  # the deposit paid live: the bank had run out again
            if bank > 0:
                bank -= 1
                continue
            if minute.call_sid != call.call_sid:
                price = await self._rate_at(connection, account, minute.posted_at)
                if price > budget:
                    return
                budget -= price  # that call's settlement moves it
                continue
            due_at = self._final_due_at(timeline, minute.key)
            if due_at is None:
                return
            price = await self._rate_at(connection, account, due_at)
            if price > min(budget, room):
                return
            original = await load_minute(connection, minute.key)
            await rebook(
                connection,
                call,
                original,
                source="deposit",
                currency=account.currency,
                price=price,
                now=now,
            )
            budget -= price
            room -= price

    async def _first_early_block(
        self, connection: Transaction, call: Record, account: Record
    ) -> ledger_store.Listed | None:
        """The account's first block since the call began bought for a call while the deposit
        held a minute at the rate then (None: none). An auto top-up block is not one: the
        customer asked for it whatever the deposit held."""
        blocks = await ledger_store.account_transactions(
            connection,
            account.account_id,
            frozenset({ledger.TransactionKind.CARD_BLOCK}),
            posted_since=call.started_at,
        )
        for block in blocks:
            if block.call_sid is None:
                continue  # auto top-up: the customer asked for the block whatever the deposit held
            deposit_then = await _booked_before(connection, account.account_id, "deposit", block)
            if deposit_then >= await self._rate_at(connection, account, block.posted_at):
                return block
        return None

    def _final_due_at(self, timeline: Timeline, key: str) -> dt.datetime | None:
        """When the minute fell due by the final timeline (None: it did not)."""
        agent_id, n = ledger.parse_minute_key(key)
        time = timeline.agents.get(agent_id)
        if time is None:
            return None
        due_seconds = rating.minute_due_at_seconds(time.billable, n, self._increment_seconds)
        return None if due_seconds is None else dt.datetime.fromtimestamp(due_seconds, dt.UTC)

    async def _rate_at(self, connection: Transaction, account: Record, at: dt.datetime) -> int:
        return await self._rates.rate_at(
            connection, RateKind.PER_AGENT_MINUTE, account.currency, at
        )

    async def _pay_unpaid_from_the_card(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        deposit_given_back: list[tuple[int, int]],
        now: dt.datetime,
    ) -> None:
        """Authorise mode: a minute nothing could pay when it fell due (two agents' minutes due
        at once with one minute's funds left, or a rate rise the deposit could not follow) made
        meterd buy an authorisation for the call; it was still on its way. The funding order is
        bank, deposit, card, then debt or owed: each minute still owed or put on debt is paid
        from the call's authorisations while they hold its price, in the order the minutes
        were taken, at the price it had. Then the deposit money freed (by those on debt, and
        by `deposit_given_back`: deposit-paid minutes the final timeline does not support, as
        (live order, price)) pays the card minutes it would have paid."""
        freed = list(deposit_given_back)  # (live order, price)
        unpaid = await _unpaid_minutes(connection, call, account.currency, debt=True)
        hold = 0
        if unpaid:
            funds = await self._funding.funds(connection, account, call.call_sid, now)
            hold = funds.card_hold_minor
        for key, price in unpaid:
            if not 0 < price <= hold:
                continue
            original = await load_minute(connection, key)
            if original.kind == ledger.TransactionKind.MINUTE_DEBT:
                freed.append((await _live_order(connection, key), price))
            await rebook(
                connection, call, original, source="card", currency=account.currency,
                price=price, now=now,
            )  # fmt: skip
            hold -= price
        if freed:  # rare: most calls ask the database nothing more
            await self._pay_from_the_deposit_freed(connection, call, account, freed, now)

    async def _pay_from_the_deposit_freed(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        freed_minor: list[tuple[int, int]],
        now: dt.datetime,
    ) -> None:
        """`freed_minor`, (live order, price): deposit money the funding order had and live
        did not (a debt minute the card now pays; a deposit minute given back). The call's card
        minutes taken after it are moved onto the deposit, in the order taken, while the
        deposit (as it would have been then, and as it is now) holds their price."""
        deposit_book = ledger.deposit_book(call.account_id)
        room = (await ledger_store.balances(connection, [deposit_book])).get(deposit_book, 0)
        moved_minor = 0
        for live_order, key in await _in_live_order(
            connection, call.call_sid, frozenset({ledger.TransactionKind.MINUTE_CARD})
        ):
            if key != ledger.live_minute_key(key):
                continue  # one settlement moved onto the card itself
            original = await load_minute(connection, key)
            price = _price(original, account.currency)
            freed = sum(p for order, p in freed_minor if order < live_order) - moved_minor
            then = await ledger_store.balance_before(connection, deposit_book, live_order) + freed
            if not 0 < price <= min(then, room):
                continue
            await rebook(
                connection, call, original, source="deposit", currency=account.currency,
                price=price, now=now,
            )  # fmt: skip
            room -= price
            moved_minor += price

    async def _pay_owed_from_the_deposit(
        self, connection: Transaction, call: Record, account: Record, now: dt.datetime
    ) -> None:
        """A minute owed live (nothing could pay it then) is paid from the deposit if, once
        settlement has given back what the final timeline does not support, the deposit holds
        its price: the funding order is bank, deposit, then owed. Each is rebooked at the price
        it was owed at, in the order it was posted."""
        deposit_book = ledger.deposit_book(call.account_id)
        deposit = (await ledger_store.balances(connection, [deposit_book])).get(deposit_book, 0)
        for key, price in await _unpaid_minutes(connection, call, account.currency):
            if not 0 < price <= deposit:
                continue
            await rebook(
                connection,
                call,
                await load_minute(connection, key),
                source="deposit",
                currency=account.currency,
                price=price,
                now=now,
            )
            deposit -= price


async def _unpaid_minutes(
    connection: Transaction, call: Record, currency: str, *, debt: bool = False
) -> list[tuple[str, int]]:
    """The call's minutes still owed (and, with `debt`, those put on debt), as (key, price),
    in the order they were taken."""
    kinds = {ledger.TransactionKind.MINUTE_RECEIVABLE}
    if debt:
        kinds.add(ledger.TransactionKind.MINUTE_DEBT)
    return [
        (key, _price(await load_minute(connection, key), currency))
        for _, key in await _in_live_order(connection, call.call_sid, frozenset(kinds))
    ]


async def _live_order(connection: Transaction, key: str) -> int:
    """Where a minute stands in posting order: the id of its first posting, so a minute
    settlement repriced keeps its place among the call's minutes."""
    return await ledger_store.transaction_id(connection, ledger.live_minute_key(key))


async def _in_live_order(
    connection: Transaction, call_sid: str, kinds: frozenset[str]
) -> list[tuple[int, str]]:
    """The call's unreversed minutes of these kinds, as (live order, key), in that order."""
    keys = await ledger_store.unreversed_keys(connection, call_sid, kinds)
    return sorted([(await _live_order(connection, key), key) for key in keys])


async def _booked_before(
    connection: Transaction, account_id: str, payer: str, block: ledger_store.Listed
) -> int:
    """The account's bank (minutes) or deposit (money) just before `block` as finally booked:
    without what was given back since (a minute its final timeline does not support, a waived
    call's charges). A minute settlement rebooked (onto another payer, or at another price)
    still counts where it was taken: it was paid, by whoever."""
    book = ledger.bank_book(account_id) if payer == "bank" else ledger.deposit_book(account_id)
    held = await ledger_store.balance_before(connection, book, block.transaction_id)
    for listed in await ledger_store.account_transactions(
        connection,
        account_id,
        frozenset({ledger.TransactionKind.REVERSAL}),
        after_id=block.transaction_id,
    ):
        reversal = await load_minute(connection, listed.key)
        original_key = reversal.reverses_key or ""
        taken_before = await ledger_store.transaction_id(connection, original_key)
        if taken_before < block.transaction_id and not await _rebooked(connection, original_key):
            held += sum(p.amount for p in reversal.postings if p.book == book)
    return held


async def _rebooked(connection: Transaction, key: str) -> bool:
    """Whether settlement posted the minute `key` again under another key (a rebooking or a
    repricing): then reversing `key` moved the minute, it did not give it back."""
    if ":minute:" not in key:
        return False
    live = ledger.live_minute_key(key)
    for other in (live, *(live + suffix for suffix in ledger.SETTLEMENT_SUFFIXES)):
        if other != key and await ledger_store.load_transaction(connection, other) is not None:
            return True
    return False


async def _minutes_after(
    connection: Transaction, account_id: str, block: ledger_store.Listed
) -> list[ledger_store.Listed]:
    """The account's minutes (every call's) first taken after `block`, in that order: those the
    bank paid live, and those settlement moved onto the deposit since."""
    kinds = ledger.TransactionKind
    after = await ledger_store.account_transactions(
        connection,
        account_id,
        frozenset({kinds.MINUTE_BANK, kinds.MINUTE_DEPOSIT}),
        after_id=block.transaction_id,
    )
    walk = [(await _live_order(connection, m.key), m) for m in after if _walked(m.key)]
    return [m for order, m in sorted(walk, key=lambda p: p[0]) if order > block.transaction_id]


def _walked(key: str) -> bool:
    """A minute the early-block walk looks at: one the bank paid live (its first key), or one
    settlement moved onto the deposit (only this step and owed minutes do; both count)."""
    return key == ledger.live_minute_key(key) or key.endswith(ledger.REBOOKED_FROM_DEPOSIT_SUFFIX)


def _price(transaction: ledger.Transaction, currency: str) -> int:
    """What a minute cost: its posting to the usage revenue book."""
    revenue_book = ledger.usage_revenue_book(currency)
    return sum(p.amount for p in transaction.postings if p.book == revenue_book)
