"""What settlement gave back of a call's live minutes (taken live, not supported by the final
timeline), for the funding order (`funding_order.py`) to restore what they held."""

from __future__ import annotations

from dataclasses import dataclass, field

from meterd.core import ledger
from meterd.store import ledger_store
from meterd.store.transaction import Transaction


@dataclass
class GivenBack:
    """The minutes settlement gave back (taken live, not supported by the final timeline) that
    held a payer: banked ones (their transaction ids) and deposit-paid ones (live order, price)."""

    bank_ids: list[int] = field(default_factory=list)
    deposit_minutes: list[tuple[int, int]] = field(default_factory=list)

    async def add(
        self, connection: Transaction, original: ledger.Transaction, account_id: str | None
    ) -> None:
        kind = ledger.TransactionKind
        if original.kind == kind.MINUTE_BANK:
            self.bank_ids.append(await ledger_store.transaction_id(connection, original.key))
        elif original.kind == kind.MINUTE_DEPOSIT and account_id is not None:
            deposit_book = ledger.deposit_book(account_id)
            price = -sum(p.amount for p in original.postings if p.book == deposit_book)
            order = await ledger_store.transaction_id(connection, original.key)
            self.deposit_minutes.append((order, price))
