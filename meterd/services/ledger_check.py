"""`meterd ledger check`: re-derive every balance from the postings and test every invariant."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meterd.store import ledger_check_store as find
from meterd.store.database import Database
from meterd.store.transaction import Record, Transaction

FINDINGS_MAX = 100  # per kind of breach; the count is always reported in full


@dataclass(frozen=True)
class Breach:
    invariant: str
    detail: str


@dataclass(frozen=True)
class CheckReport:
    transactions: int
    postings: int
    books: int
    breaches: tuple[Breach, ...]

    @property
    def ok(self) -> bool:
        return not self.breaches


async def check_ledger(database: Database) -> CheckReport:
    """Every transaction balances per unit and has postings; every customer book's stored
    balance equals the sum of its postings, and every system book's stored balance is 0 (it
    keeps none: its balance is the sum of its postings, migration 0006); a book is of kind
    'system' exactly when its name says `system:`; no book that may not go negative is negative
    (by the sum of its postings); every reversal names a transaction that exists."""
    async with database.read() as connection:
        size = await find.ledger_size(connection)
        breaches = [
            Breach(invariant.name, invariant.describe(row))
            for invariant in INVARIANTS
            for row in await invariant.find(connection, FINDINGS_MAX)
        ]
    return CheckReport(
        transactions=size.transactions,
        postings=size.postings,
        books=size.books,
        breaches=tuple(breaches),
    )


@dataclass(frozen=True)
class Invariant:
    name: str
    find: Callable[[Transaction, int], Awaitable[list[Record]]]  # the rows that break it
    describe: Callable[[Record], str]  # one such row, for the report


# in the order their breaches are reported
INVARIANTS = (
    Invariant(
        "transaction balances",
        find.unbalanced_transactions,
        lambda row: (
            f"transaction {row.transaction_id} ({row.idempotency_key}) sums to "
            f"{row.total} {row.unit}, not 0"
        ),
    ),
    Invariant(
        "transaction has postings",
        find.transactions_without_postings,
        lambda row: f"transaction {row.transaction_id} ({row.idempotency_key}) has no postings",
    ),
    Invariant(
        "balance equals the sum of postings",
        find.customer_balances_off_their_postings,
        lambda row: f"book {row.book} holds {row.balance} but its postings sum to {row.total}",
    ),
    Invariant(
        "system book keeps no stored balance",
        find.system_books_keeping_a_balance,
        lambda row: (
            f"book {row.book} holds {row.balance}, but a system book's stored balance "
            f"stays 0 (its balance is the sum of its postings)"
        ),
    ),
    Invariant(
        "book kind matches its name",
        find.books_of_the_wrong_kind,
        lambda row: (
            f"book {row.book} is of kind {row.kind} (account {row.account_id}); kind "
            f"'system', with no account, is for exactly the books named system:..."
        ),
    ),
    Invariant(
        "balance not negative",
        find.negative_books_not_allowed_to_be,
        lambda row: f"book {row.book} may not go negative but its postings sum to {row.total}",
    ),
    Invariant(
        "reversal names an existing transaction",
        find.reversals_of_unknown_keys,
        lambda row: f"transaction {row.transaction_id} reverses unknown key {row.reverses_key}",
    ),
)
