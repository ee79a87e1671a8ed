"""`meterd ledger check`: re-derive every balance from the postings and test every invariant."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, literal, select

from meterd.store.database import Database
from meterd.store.ledger_store import system_book_clause
from meterd.store.schema import ledger_books, ledger_postings, ledger_transactions

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
    breaches: list[Breach] = []
    t, p, b = ledger_transactions, ledger_postings, ledger_books
    async with database.read() as connection:
        counts = (
            await connection.execute(
                select(
                    select(func.count()).select_from(t).scalar_subquery(),
                    select(func.count()).select_from(p).scalar_subquery(),
                    select(func.count()).select_from(b).scalar_subquery(),
                )
            )
        ).one()

        unbalanced = await connection.execute(
            select(p.c.transaction_id, t.c.idempotency_key, p.c.unit, func.sum(p.c.amount))
            .join(t, t.c.transaction_id == p.c.transaction_id)
            .group_by(p.c.transaction_id, t.c.idempotency_key, p.c.unit)
            .having(func.sum(p.c.amount) != 0)
            .order_by(p.c.transaction_id)
            .limit(FINDINGS_MAX)
        )
        breaches += [
            Breach(
                "transaction balances",
                f"transaction {row[0]} ({row[1]}) sums to {row[3]} {row[2]}, not 0",
            )
            for row in unbalanced
        ]

        empty = await connection.execute(
            select(t.c.transaction_id, t.c.idempotency_key)
            .where(~select(literal(1)).where(p.c.transaction_id == t.c.transaction_id).exists())
            .order_by(t.c.transaction_id)
            .limit(FINDINGS_MAX)
        )
        breaches += [
            Breach("transaction has postings", f"transaction {row[0]} ({row[1]}) has no postings")
            for row in empty
        ]

        sums = select(p.c.book, func.sum(p.c.amount).label("total")).group_by(p.c.book).subquery()
        system = system_book_clause(b.c.book)
        mismatched = await connection.execute(
            select(b.c.book, b.c.balance, func.coalesce(sums.c.total, 0))
            .outerjoin(sums, sums.c.book == b.c.book)
            .where(~system, b.c.balance != func.coalesce(sums.c.total, 0))
            .order_by(b.c.book)
            .limit(FINDINGS_MAX)
        )
        breaches += [
            Breach(
                "balance equals the sum of postings",
                f"book {row[0]} holds {row[1]} but its postings sum to {row[2]}",
            )
            for row in mismatched
        ]

        kept = await connection.execute(
            select(b.c.book, b.c.balance)
            .where(system, b.c.balance != 0)
            .order_by(b.c.book)
            .limit(FINDINGS_MAX)
        )
        breaches += [
            Breach(
                "system book keeps no stored balance",
                f"book {row[0]} holds {row[1]}, but a system book's stored balance stays 0 "
                f"(its balance is the sum of its postings)",
            )
            for row in kept
        ]

        misnamed = await connection.execute(
            select(b.c.book, b.c.kind, b.c.account_id)
            .where(
                (system & ((b.c.kind != "system") | b.c.account_id.is_not(None)))
                | (~system & (b.c.kind == "system"))
            )
            .order_by(b.c.book)
            .limit(FINDINGS_MAX)
        )
        breaches += [
            Breach(
                "book kind matches its name",
                f"book {row[0]} is of kind {row[1]} (account {row[2]}); kind 'system', with no "
                f"account, is for exactly the books named system:...",
            )
            for row in misnamed
        ]

        negative = await connection.execute(
            select(b.c.book, sums.c.total)
            .join(sums, sums.c.book == b.c.book)
            .where(~b.c.allow_negative, sums.c.total < 0)
            .order_by(b.c.book)
            .limit(FINDINGS_MAX)
        )
        breaches += [
            Breach(
                "balance not negative",
                f"book {row[0]} may not go negative but its postings sum to {row[1]}",
            )
            for row in negative
        ]

        original = t.alias("original")
        orphans = await connection.execute(
            select(t.c.transaction_id, t.c.reverses_key)
            .outerjoin(original, original.c.idempotency_key == t.c.reverses_key)
            .where(t.c.reverses_key.is_not(None), original.c.transaction_id.is_(None))
            .limit(FINDINGS_MAX)
        )
        breaches += [
            Breach(
                "reversal names an existing transaction",
                f"transaction {row[0]} reverses unknown key {row[1]}",
            )
            for row in orphans
        ]
    return CheckReport(
        transactions=counts[0], postings=counts[1], books=counts[2], breaches=tuple(breaches)
    )
