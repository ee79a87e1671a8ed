"""The queries behind `meterd ledger check` (meterd/services/ledger_check.py): each finds the rows
that break one invariant of the ledger tables, at most `limit` of them, in a stable order.

A system book (`system:...`) keeps no stored balance: its balance is the sum of its postings
(migration 0006, meterd/store/ledger_store.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Executable, Subquery, func, literal, select

from meterd.store.ledger_store import system_book_clause
from meterd.store.schema import ledger_books, ledger_postings, ledger_transactions
from meterd.store.transaction import Record, Transaction

t, p, b = ledger_transactions, ledger_postings, ledger_books


@dataclass(frozen=True)
class LedgerSize:
    transactions: int
    postings: int
    books: int


async def _rows(connection: Transaction, query: Executable) -> list[Record]:
    return list((await connection.execute(query)).all())


def _sums_per_book() -> Subquery:
    return select(p.c.book, func.sum(p.c.amount).label("total")).group_by(p.c.book).subquery()


async def ledger_size(connection: Transaction) -> LedgerSize:
    counts = (
        await connection.execute(
            select(
                select(func.count()).select_from(t).scalar_subquery(),
                select(func.count()).select_from(p).scalar_subquery(),
                select(func.count()).select_from(b).scalar_subquery(),
            )
        )
    ).one()
    return LedgerSize(transactions=counts[0], postings=counts[1], books=counts[2])


async def unbalanced_transactions(connection: Transaction, limit: int) -> list[Record]:
    """Per transaction and unit whose postings do not sum to 0: `transaction_id`,
    `idempotency_key`, `unit`, `total`."""
    return await _rows(
        connection,
        select(
            p.c.transaction_id,
            t.c.idempotency_key,
            p.c.unit,
            func.sum(p.c.amount).label("total"),
        )
        .join(t, t.c.transaction_id == p.c.transaction_id)
        .group_by(p.c.transaction_id, t.c.idempotency_key, p.c.unit)
        .having(func.sum(p.c.amount) != 0)
        .order_by(p.c.transaction_id)
        .limit(limit),
    )


async def transactions_without_postings(connection: Transaction, limit: int) -> list[Record]:
    """`transaction_id`, `idempotency_key`."""
    return await _rows(
        connection,
        select(t.c.transaction_id, t.c.idempotency_key)
        .where(~select(literal(1)).where(p.c.transaction_id == t.c.transaction_id).exists())
        .order_by(t.c.transaction_id)
        .limit(limit),
    )


async def customer_balances_off_their_postings(connection: Transaction, limit: int) -> list[Record]:
    """Customer books whose stored balance is not the sum of their postings: `book`, `balance`,
    `total`."""
    sums = _sums_per_book()
    total = func.coalesce(sums.c.total, 0)
    return await _rows(
        connection,
        select(b.c.book, b.c.balance, total.label("total"))
        .outerjoin(sums, sums.c.book == b.c.book)
        .where(~system_book_clause(b.c.book), b.c.balance != total)
        .order_by(b.c.book)
        .limit(limit),
    )


async def system_books_keeping_a_balance(connection: Transaction, limit: int) -> list[Record]:
    """System books whose stored balance is not 0: `book`, `balance`."""
    return await _rows(
        connection,
        select(b.c.book, b.c.balance)
        .where(system_book_clause(b.c.book), b.c.balance != 0)
        .order_by(b.c.book)
        .limit(limit),
    )


async def books_of_the_wrong_kind(connection: Transaction, limit: int) -> list[Record]:
    """Books named `system:...` that are not of kind 'system' with no account, and books of
    kind 'system' not so named: `book`, `kind`, `account_id`."""
    system = system_book_clause(b.c.book)
    return await _rows(
        connection,
        select(b.c.book, b.c.kind, b.c.account_id)
        .where(
            (system & ((b.c.kind != "system") | b.c.account_id.is_not(None)))
            | (~system & (b.c.kind == "system"))
        )
        .order_by(b.c.book)
        .limit(limit),
    )


async def negative_books_not_allowed_to_be(connection: Transaction, limit: int) -> list[Record]:
    """Books that may not go negative whose postings sum below zero: `book`, `total`."""
    sums = _sums_per_book()
    return await _rows(
        connection,
        select(b.c.book, sums.c.total)
        .join(sums, sums.c.book == b.c.book)
        .where(~b.c.allow_negative, sums.c.total < 0)
        .order_by(b.c.book)
        .limit(limit),
    )


async def reversals_of_unknown_keys(connection: Transaction, limit: int) -> list[Record]:
    """Transactions reversing a key no transaction has: `transaction_id`, `reverses_key`."""
    original = t.alias("original")
    return await _rows(
        connection,
        select(t.c.transaction_id, t.c.reverses_key)
        .outerjoin(original, original.c.idempotency_key == t.c.reverses_key)
        .where(t.c.reverses_key.is_not(None), original.c.transaction_id.is_(None))
        .limit(limit),
    )
