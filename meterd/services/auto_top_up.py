"""Auto top-up: an account may have a block bought on its card on file as soon as its banked
minutes fall below a threshold it sets (`auto_top_up_below_minutes`), outside calls too, so a
caller never meets an empty bank (docs/billing.md, Auto top-up).

A job looks every few seconds. Under the account's lock (the funding authority's
serialisation: the same lock a live minute's block is decided under), it buys one block only if
the bank is still below the threshold, no block of the account is on its way (auto top-up or a
call's), the account's latest card purchase did not fail (a decline is resolved by a purchase
that succeeds, e.g. a new card given at the gate; meterd never retries a declined card on its
own), and fewer than `auto_top_up_per_day` were bought in the last 24 hours. Block card mode
only: in authorise mode there is no bank to fill."""

from __future__ import annotations

import datetime as dt

from meterd.clock import Clock
from meterd.core import ledger
from meterd.logs import get_logger
from meterd.services.funding import has_card, lock_account
from meterd.services.rates import RateBook, RateKind
from meterd.store import accounts_store, auto_top_up_store, ledger_store, payments_store
from meterd.store.database import Database
from meterd.store.payments_store import PaymentKind, PaymentStatus
from meterd.store.repositories import Repositories

log = get_logger("meterd.auto_top_up")


class AutoTopUp:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        rates: RateBook,
        *,
        enabled: bool,
        block_minutes: int,
        per_day: int,
    ) -> None:
        self._database = database
        self._clock = clock
        self._rates = rates
        self._enabled = enabled  # block card mode with a gateway
        self._block_minutes = block_minutes
        self._per_day = per_day

    async def run(self) -> int:
        """Queue a block for each account below its threshold that may have one; the payments
        job sends it. Returns how many were queued."""
        if not self._enabled:
            return 0
        async with self._database.read() as connection:
            candidates = await auto_top_up_store.below_threshold(connection)
        queued = 0
        for account_id in candidates:
            queued += await self._top_up(account_id)
        return queued

    async def _top_up(self, account_id: str) -> int:
        now = self._clock()
        async with self._database.write() as connection:
            account = await lock_account(connection, account_id)
            own = await accounts_store.thresholds(connection, account_id)
            threshold = own["auto_top_up_below_minutes"]
            book = ledger.bank_book(account_id)
            bank = (await ledger_store.balances(connection, [book])).get(book, 0)
            if not threshold or bank >= threshold or not has_card(account):
                return 0  # topped up since, or turned off
            if await Repositories(connection).cards.block_in_flight(account_id):
                return 0  # one is on its way (ours or a call's): at most one at a time
            if await auto_top_up_store.latest_purchase_failed(connection, account_id):
                return 0
            day_ago = now - dt.timedelta(days=1)
            if await auto_top_up_store.bought(connection, account_id, day_ago) >= self._per_day:
                return 0
            n = await auto_top_up_store.all_bought(connection, account_id) + 1
            key = f"{auto_top_up_store.key_prefix(account_id)}{n}"
            price = await self._rates.rate_at(connection, RateKind.BLOCK, account.currency, now)
            await payments_store.insert_operation(
                connection,
                key=key,
                kind=PaymentKind.CHARGE,
                account_id=account_id,
                call_sid=None,
                amount_minor=price,
                currency=account.currency,
                minutes=self._block_minutes,
                related_key=None,
                status=PaymentStatus.QUEUED,
                created_at=now,
            )
        log.info("auto top-up: buying a block", account_id=account_id, bank_minutes=bank)
        return 1
