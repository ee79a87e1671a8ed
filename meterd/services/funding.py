"""The funding authority: the one place that decides how an account's calls are paid for.

Every path that takes or gives back an account's minutes or money asks it, inside its own
database transaction: the connect gate (answering), each live minute and the top-up before funds
run out (metering), settlement (incidents), a waiver and a card payment's completion (payments).
Its decisions follow docs/billing.md: bank, then deposit at the per-minute rate in force when the
minute is due, then the card (block mode: a block bought into the bank; authorise mode: the
call's authorisations, by money), then debt under `allow_debt`, else owed (a receivable).

It is serialised per account. `lock_account` takes the account's row lock on PostgreSQL
(`SELECT ... FOR UPDATE`); on SQLite the write transaction (`BEGIN IMMEDIATE`) is exclusive
already. Two calls of one account are therefore decided one after the other, and each decision
sees the other's postings and card operations (one block bought when one suffices).

One lock order everywhere, so no two transactions wait on each other in a circle: the call's row
(if any), then the account's row, then the account's books. System books are never row-locked:
their balance is the sum of their postings, not a row every posting updates.

What it knows of the card (from `payment_operations`): a block queued or sent for the account,
an authorisation queued or sent for the call, the money the call's authorisations still hold
(authorised less the money of minutes paid from them), and whether the call's last card
payment failed (then it announces instead of trying the card again).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from meterd.config import CardMode
from meterd.core import ledger, rating
from meterd.core.plans import Plan
from meterd.core.rating import Funding, Source
from meterd.services.errors import InvariantBroken
from meterd.services.rates import RateBook, RateKind
from meterd.store import ledger_store, repositories
from meterd.store.calls_store import CallStatus
from meterd.store.payments_store import IN_FLIGHT
from meterd.store.repositories import Repositories, RepositoriesFactory
from meterd.store.transaction import Record, Transaction


class CardPayments(Protocol):
    """What the authority asks of card payments: meterd.services.payments.PaymentService (which
    imports this module, so this one names only what it uses)."""

    @property
    def available(self) -> bool: ...

    async def queue_top_up(
        self, connection: Transaction, account: Record, call_sid: str
    ) -> None: ...

    async def queue_incident(
        self,
        connection: Transaction,
        account: Record,
        call_sid: str,
        key: str,
        amount_minor: int,
    ) -> None: ...


async def lock_account(connection: Transaction, account_id: str) -> Record:
    """The account's row, locked until the transaction ends (PostgreSQL; SQLite's write
    transaction is exclusive already). Take it after the call's row, before the books."""
    return await locked_account(Repositories(connection), account_id)


async def locked_account(repos: Repositories, account_id: str) -> Record:
    """`lock_account` on repositories."""
    account = await repos.accounts.lock(account_id)
    if account is None:
        raise InvariantBroken(f"account {account_id} is referenced but does not exist")
    return account


def has_card(account: Record) -> bool:
    return bool(account.card_customer and account.card_on_file)


def owes_nothing(call: Record) -> bool:
    """A waived call, or one that never connected (the caller hung up while paying): nothing of
    it is kept, whenever its card payments complete."""
    return call.waived_at is not None or call.status == CallStatus.REJECTED


@dataclass(frozen=True)
class Funds:
    """What an account can pay a call's minutes with, at one moment, under its lock."""

    bank_minutes: int
    deposit_minor: int
    rate_minor: int  # per agent-minute, in force at the moment asked about
    card_hold_minor: int  # authorise mode: money the call's authorisations still hold

    @property
    def minutes_left(self) -> int:
        """Agent-minutes bank, deposit and the call's authorisations can still pay for."""
        from_card = self.card_hold_minor // self.rate_minor if self.rate_minor > 0 else 0
        return rating.minutes_left(self.bank_minutes, self.deposit_minor, self.rate_minor) + max(
            from_card, 0
        )

    @property
    def can_pay_a_minute(self) -> bool:
        return (
            self.bank_minutes >= 1
            or self.rate_minor == 0
            or self.deposit_minor >= self.rate_minor
            or self.card_hold_minor >= self.rate_minor
        )


class FundingAuthority:
    def __init__(
        self,
        rates: RateBook,
        payments: CardPayments,
        *,
        card_mode: CardMode,
        allow_debt: bool,
        repositories: RepositoriesFactory = Repositories,
    ) -> None:
        self._repositories = repositories
        self._rates = rates
        self._payments = payments
        self._block_mode = CardMode(card_mode) is CardMode.BLOCK
        self._allow_debt = allow_debt

    async def funds(
        self, connection: Transaction, account: Record, call_sid: str, at: dt.datetime
    ) -> Funds:
        bank, deposit = (
            ledger.bank_book(account.account_id),
            ledger.deposit_book(account.account_id),
        )
        repos = self._repositories(connection)
        held = await repos.ledger.balances([bank, deposit])
        rate_minor = await self._rates.rate_at(
            connection, RateKind.PER_AGENT_MINUTE, account.currency, at
        )
        card_hold_minor = 0
        # no card, no authorisation: a card is saved before any payment on it, and never removed
        if not self._block_mode and has_card(account):
            card_hold_minor = await repos.cards.hold_left_minor(call_sid, account.currency)
        return Funds(held.get(bank, 0), held.get(deposit, 0), rate_minor, card_hold_minor)

    # --- the connect gate ---------------------------------------------------------------------

    async def can_connect(
        self, connection: Transaction, account_id: str, call_sid: str, now: dt.datetime
    ) -> bool:
        """A per-minute caller is connected with a banked minute, one agent-minute at the rate
        in force now in the deposit, or an authorisation of this call that holds one."""
        account = await locked_account(self._repositories(connection), account_id)
        return (await self.funds(connection, account, call_sid, now)).can_pay_a_minute

    async def why_no_callback(
        self, connection: Transaction, account_id: str, now: dt.datetime
    ) -> str | None:
        """Why a per-minute account's callback cannot be placed, or None if it can: as the
        connect gate, a banked minute or one agent-minute at the rate in force in the deposit;
        or a card on file, charged (or authorised) by the gate when the customer answers, as
        for a caller with no funds. An outbound leg has no `<Pay>`: no card, no callback."""
        account = await locked_account(self._repositories(connection), account_id)
        funds = await self.funds(connection, account, "", now)
        if funds.can_pay_a_minute or (self._payments.available and has_card(account)):
            return None
        card = "no card on file" if self._payments.available else "card payments are off"
        return (
            f"account {account_id} cannot pay a minute: {funds.bank_minutes} banked minutes, "
            f"{funds.deposit_minor} in the deposit (a minute costs {funds.rate_minor} "
            f"{account.currency} minor units) and {card}"
        )

    # --- each minute --------------------------------------------------------------------------

    async def fund_minute(
        self,
        connection: Transaction,
        account: Record,
        call: Record,
        due_at: dt.datetime,
    ) -> Funding:
        """How one agent-minute of the call, due at `due_at`, is paid. A waived call's minutes
        are still metered, at no charge (the waiver gives back every charge of the call)."""
        if call.plan != Plan.PER_MINUTE or call.waived_at is not None:
            return Funding(Source.COVERED)
        funds = await self.funds(connection, account, call.call_sid, due_at)
        return rating.fund_minute(
            per_minute=True,
            bank_minutes=funds.bank_minutes,
            deposit_minor=funds.deposit_minor,
            rate_minor=funds.rate_minor,
            allow_debt=self._allow_debt,
            card_hold_minor=funds.card_hold_minor,
        )

    async def fund_repriced_minute(
        self,
        connection: Transaction,
        account: Record,
        call_sid: str,
        source: Source,
        *,
        old_price_minor: int,
        new_price_minor: int,
        now: dt.datetime,
    ) -> Source:
        """Who pays a minute settlement re-prices (`rating.repriced_source`)."""
        funds = await self.funds(connection, account, call_sid, now)
        return rating.repriced_source(
            source,
            old_price_minor=old_price_minor,
            new_price_minor=new_price_minor,
            deposit_minor=funds.deposit_minor,
            card_hold_minor=max(funds.card_hold_minor, 0),
            allow_debt=self._allow_debt,
        )

    # --- before funds run out -----------------------------------------------------------------

    async def keep_funded(
        self,
        connection: Transaction,
        account: Record,
        call_sid: str,
        accruing_agents: int,
        now: dt.datetime,
    ) -> tuple[Funds, bool]:
        """When the funds cannot pay the next minute of every accruing agent (fewer minutes left
        than agents accruing; none left while nobody accrues), the card's next block
        (account-wide) or authorisation (this call) is bought, queued here unless one is on its
        way already: not earlier, so the deposit pays before the card; the minute now running
        leaves the payment a whole increment to land. Returns the funds and whether the card
        stands behind the call (a payment on its way, or a usable card on file); False: the call
        should be announced."""
        funds = await self.funds(connection, account, call_sid, now)
        if not has_card(account):
            return funds, False  # a card is saved before any payment on it: none is on its way
        if await self._card_payment_on_its_way(connection, account.account_id, call_sid):
            return funds, True
        if not self._payments.available:
            return funds, False
        if await self._repositories(connection).cards.decline_unresolved(
            call_sid, account.account_id
        ):
            return funds, False
        if funds.minutes_left < max(1, accruing_agents):
            await self._payments.queue_top_up(connection, account, call_sid)
        return funds, True

    async def _card_payment_on_its_way(
        self, connection: Transaction, account_id: str, call_sid: str
    ) -> bool:
        cards = self._repositories(connection).cards
        if self._block_mode:  # a block lands in the account's bank: any call's will do
            return await cards.block_in_flight(account_id)
        return await cards.authorisation_in_flight(call_sid)  # it pays only its own call

    # --- incidents ----------------------------------------------------------------------------

    async def incident_payer(
        self,
        connection: Transaction,
        account: Record,
        call_sid: str,
        key: str,
        price_minor: int,
    ) -> str | None:
        """Who pays an incident: the deposit if it holds the price, else the card on file (queued
        here; the incident is posted when the card says yes, owed if it says no), else it is
        owed. None when it went to the card (or is on its way there)."""
        repos = self._repositories(connection)
        status = await repos.cards.operation_status(key)
        if status in IN_FLIGHT:
            return None
        deposit = ledger.deposit_book(account.account_id)
        if (await repos.ledger.balances([deposit])).get(deposit, 0) >= price_minor:
            return "deposit"
        if status != "failed" and self._payments.available and account.card_on_file is not None:
            await self._payments.queue_incident(connection, account, call_sid, key, price_minor)
            return None
        return "receivable"


async def card_money_used_minor(connection: Transaction, call_sid: str, currency: str) -> int:
    """Money of the call's minutes paid by card authorisation, less what was given back."""
    return await repositories.card_money_used_minor(connection, call_sid, currency)


async def reverse_charges(connection: Transaction, call_sid: str, now: dt.datetime) -> int:
    """Reverse every charge of the call not reversed yet (a waiver: minutes back to the bank,
    money back to the deposit, off the receivable or back to the card's receipts). Idempotent."""
    count = 0
    for key in await ledger_store.unreversed_keys(connection, call_sid, ledger.CHARGE_KINDS):
        original = await ledger_store.load_transaction(connection, key)
        if original is None:
            raise InvariantBroken(f"{key} is listed but not in the ledger")
        await ledger_store.post(connection, ledger.reversal_of(original, memo="waiver"), now)
        count += 1
    return count
