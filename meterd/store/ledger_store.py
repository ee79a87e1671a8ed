"""Posting transactions to the ledger tables, and reading them back.

`post()` runs inside the caller's database transaction. It claims the idempotency key with
`INSERT ... ON CONFLICT DO NOTHING` and writes the postings in that same transaction, so the key
is claimed if and only if the postings are written. A trigger moves the running balance of every
customer book and the CHECK on `ledger_books` refuses a balance below zero, aborting everything.

System books (`system:...`, kind 'system') keep no running balance (migration 0006): their
stored `balance` stays 0 and their balance is the sum of their postings, which `balance()` and
`balances()` return. So a posting never updates, and never row-locks, a system book: every minute
touches `system:minutes:used`, and transactions reaching system books in different orders would
otherwise deadlock on PostgreSQL. A system book is opened on its first posting (or with its
account's currency, `open_system_books`); after that, posting to it reads its row and writes none.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.core import ledger
from meterd.core.ledger import (
    INCIDENT_KINDS,
    BookKind,
    LedgerError,
    Posting,
    Transaction,
    system_book_unit,
)
from meterd.store.schema import accounts, ledger_books, ledger_postings, ledger_transactions
from meterd.store.sql import insert_ignoring_conflict

BALANCE_CHECK_NAME = "ck_ledger_books_balance_not_negative"
SYSTEM_PREFIX = "system:"


def is_system_book(book: str) -> bool:
    """A system book keeps no running balance (see the module's docstring)."""
    return book.startswith(SYSTEM_PREFIX)


def system_book_clause(book: ColumnElement[str]) -> ColumnElement[bool]:
    """SQL: `book` names a system book; the same exact prefix test as the trigger (migration
    0006) and `is_system_book` (LIKE would be case-insensitive on SQLite)."""
    return func.substr(book, 1, len(SYSTEM_PREFIX)) == SYSTEM_PREFIX


class IdempotencyConflict(LedgerError):
    """The key was already used for a transaction with different content. Nothing was posted."""


class InsufficientBalance(LedgerError):
    """A book that may not go negative would have. Nothing was posted."""


class UnknownBook(LedgerError):
    """A posting names a customer book that does not exist."""


@dataclass(frozen=True)
class PostResult:
    transaction_id: int
    replayed: bool  # True: the same transaction was posted before; nothing new was written


async def create_book(
    connection: AsyncConnection,
    book: str,
    *,
    unit: str,
    kind: BookKind,
    account_id: str | None,
    allow_negative: bool,
) -> None:
    """Open a book (idempotent). A book that exists is only read: the insert is tried only for
    a book not there yet."""
    exists = await connection.scalar(select(ledger_books.c.book).where(ledger_books.c.book == book))
    if exists is not None:
        return
    statement = insert_ignoring_conflict(
        connection,
        ledger_books,
        {
            "book": book,
            "unit": unit,
            "kind": kind.value,
            "account_id": account_id,
            "allow_negative": allow_negative,
            "balance": 0,
        },
        ["book"],
    )
    await connection.execute(statement)


def system_books(currency: str) -> list[str]:
    """Every system book that postings in `currency` (and in minutes) use."""
    return sorted(
        {
            ledger.MINUTES_ISSUED,
            ledger.MINUTES_USED,
            ledger.MINUTES_UNBANKED,
            ledger.deposits_received_book(currency),
            ledger.usage_revenue_book(currency),
            ledger.incident_revenue_book(currency),
            ledger.card_receipts_book(currency),
            ledger.block_revenue_book(currency),
        }
    )


async def open_system_books(connection: AsyncConnection, books: list[str]) -> None:
    """Open the system books among `books` that do not exist yet, in name order. Only the first
    posting ever to a system book inserts its row (and on PostgreSQL a concurrent first posting
    to the same book waits for that insert to commit; the fixed order keeps two such first
    postings from waiting on each other). Account creation opens its currency's books, so calls
    never do."""
    wanted = sorted({book for book in books if is_system_book(book)})
    if not wanted:
        return
    existing = set(
        (
            await connection.scalars(
                select(ledger_books.c.book).where(ledger_books.c.book.in_(wanted))
            )
        ).all()
    )
    for book in wanted:
        if book not in existing:
            await connection.execute(
                insert_ignoring_conflict(
                    connection,
                    ledger_books,
                    {
                        "book": book,
                        "unit": system_book_unit(book),
                        "kind": BookKind.SYSTEM.value,
                        "account_id": None,
                        "allow_negative": True,
                        "balance": 0,  # stays 0: a system book's balance is its postings' sum
                    },
                    ["book"],
                )
            )


async def post(
    connection: AsyncConnection, transaction: Transaction, now: dt.datetime
) -> PostResult:
    """Post `transaction` once. Same key and content again: the earlier result, nothing posted.
    Same key, other content: `IdempotencyConflict`. A balance below zero: `InsufficientBalance`
    (the caller's database transaction must then roll back, which `Database.write()` does)."""
    claim = insert_ignoring_conflict(
        connection,
        ledger_transactions,
        {
            "idempotency_key": transaction.key,
            "fingerprint": transaction.fingerprint,
            "kind": transaction.kind,
            "account_id": transaction.account_id,
            "call_sid": transaction.call_sid,
            "reverses_key": transaction.reverses_key,
            "memo": transaction.memo,
            "posted_at": now,
        },
        ["idempotency_key"],
    ).returning(ledger_transactions.c.transaction_id)
    transaction_id = (await connection.execute(claim)).scalar_one_or_none()
    if transaction_id is None:
        earlier = (
            await connection.execute(
                select(
                    ledger_transactions.c.transaction_id, ledger_transactions.c.fingerprint
                ).where(ledger_transactions.c.idempotency_key == transaction.key)
            )
        ).one()
        if earlier.fingerprint != transaction.fingerprint:
            raise IdempotencyConflict(
                f"idempotency key {transaction.key!r} was already used for different content"
            )
        return PostResult(earlier.transaction_id, replayed=True)

    await open_system_books(connection, [p.book for p in transaction.postings])
    rows = [
        {"transaction_id": transaction_id, "book": p.book, "unit": p.unit, "amount": p.amount}
        for p in transaction.postings
    ]
    try:
        await connection.execute(insert(ledger_postings), rows)
    except (IntegrityError, DBAPIError) as error:
        message = str(error.orig)
        if BALANCE_CHECK_NAME in message:
            raise InsufficientBalance(
                f"{transaction.key}: a balance would go below zero"
            ) from error
        if "fk_ledger_postings_book_unit" in message or "FOREIGN KEY" in message:
            raise UnknownBook(
                f"{transaction.key}: a posting names an unknown book or the wrong unit"
            ) from error
        raise
    return PostResult(transaction_id, replayed=False)


async def balance(connection: AsyncConnection, book: str) -> int:
    """A book's balance: a customer book's running balance, a system book's sum of postings
    (a scan of that book's postings: for reports and checks, not for every minute)."""
    held = await balances(connection, [book])
    if book not in held:
        raise UnknownBook(f"no book {book!r}")
    return held[book]


async def balances(connection: AsyncConnection, books: list[str]) -> dict[str, int]:
    """The balances of those of `books` that exist (see `balance`)."""
    rows = await connection.execute(
        select(ledger_books.c.book, ledger_books.c.balance).where(ledger_books.c.book.in_(books))
    )
    held = {row.book: int(row.balance) for row in rows}
    system = [book for book in held if is_system_book(book)]
    if system:
        sums = await connection.execute(
            select(ledger_postings.c.book, func.sum(ledger_postings.c.amount))
            .where(ledger_postings.c.book.in_(system))
            .group_by(ledger_postings.c.book)
        )
        held.update(dict.fromkeys(system, 0))
        held.update({book: int(total) for book, total in sums})
    return held


async def posted_sum(connection: AsyncConnection, book: str) -> int:
    value = (
        await connection.execute(
            select(func.coalesce(func.sum(ledger_postings.c.amount), 0)).where(
                ledger_postings.c.book == book
            )
        )
    ).scalar_one()
    return int(value)


async def balance_before(connection: AsyncConnection, book: str, transaction_id: int) -> int:
    """A book's balance just before a transaction was posted: the sum of its postings in
    transactions posted earlier (ids grow in posting order)."""
    value = await connection.scalar(
        select(func.coalesce(func.sum(ledger_postings.c.amount), 0)).where(
            ledger_postings.c.book == book, ledger_postings.c.transaction_id < transaction_id
        )
    )
    return int(value or 0)


async def balances_for_update(connection: AsyncConnection, books: list[str]) -> dict[str, int]:
    """Balances, locked until the transaction ends (PostgreSQL; SQLite's write transaction is
    exclusive already), so a funding decision cannot be overtaken by another transaction.
    Customer books only: a system book is never locked (migration 0006)."""
    locked_system = [book for book in books if is_system_book(book)]
    if locked_system:
        raise LedgerError(f"system books are never locked: {locked_system}")
    query = (
        select(ledger_books.c.book, ledger_books.c.balance)
        .where(ledger_books.c.book.in_(books))
        .order_by(ledger_books.c.book)
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    return {row.book: int(row.balance) for row in await connection.execute(query)}


async def load_transaction(connection: AsyncConnection, key: str) -> Transaction | None:
    """A posted transaction, rebuilt from its rows (to reverse it exactly)."""
    row = (
        await connection.execute(
            select(ledger_transactions).where(ledger_transactions.c.idempotency_key == key)
        )
    ).one_or_none()
    if row is None:
        return None
    postings = await connection.execute(
        select(ledger_postings.c.book, ledger_postings.c.unit, ledger_postings.c.amount)
        .where(ledger_postings.c.transaction_id == row.transaction_id)
        .order_by(ledger_postings.c.posting_id)
    )
    return Transaction(
        key=row.idempotency_key,
        kind=row.kind,
        account_id=row.account_id,
        call_sid=row.call_sid,
        memo=row.memo,
        reverses_key=row.reverses_key,
        postings=tuple(Posting(p.book, p.unit, int(p.amount)) for p in postings),
    )


async def transaction_id(connection: AsyncConnection, key: str) -> int:
    """The id of a posted transaction (ids grow in posting order)."""
    value = await connection.scalar(
        select(ledger_transactions.c.transaction_id).where(
            ledger_transactions.c.idempotency_key == key
        )
    )
    if value is None:
        raise LedgerError(f"no transaction {key!r}")
    return int(value)


async def posted_at(connection: AsyncConnection, key: str) -> dt.datetime:
    """When a posted transaction was written (meterd's clock)."""
    value = await connection.scalar(
        select(ledger_transactions.c.posted_at).where(ledger_transactions.c.idempotency_key == key)
    )
    if not isinstance(value, dt.datetime):
        raise LedgerError(f"no transaction {key!r}")
    return value


async def is_reversed(connection: AsyncConnection, key: str) -> bool:
    value = await connection.scalar(
        select(ledger_transactions.c.transaction_id).where(
            ledger_transactions.c.reverses_key == key
        )
    )
    return value is not None


async def unreversed_keys(
    connection: AsyncConnection, call_sid: str, kinds: frozenset[str]
) -> list[str]:
    """Keys of the call's transactions of these kinds that no transaction reverses yet."""
    reversal = ledger_transactions.alias("reversal")
    rows = await connection.scalars(
        select(ledger_transactions.c.idempotency_key)
        .outerjoin(reversal, reversal.c.reverses_key == ledger_transactions.c.idempotency_key)
        .where(
            ledger_transactions.c.call_sid == call_sid,
            ledger_transactions.c.kind.in_(kinds),
            reversal.c.transaction_id.is_(None),
        )
        .order_by(ledger_transactions.c.transaction_id)
    )
    return list(rows.all())


@dataclass(frozen=True)
class Listed:
    """One posted transaction, as `account_transactions` lists it."""

    transaction_id: int
    key: str
    kind: str
    call_sid: str | None
    posted_at: dt.datetime


async def account_transactions(
    connection: AsyncConnection,
    account_id: str,
    kinds: frozenset[str],
    *,
    after_id: int = 0,
    posted_since: dt.datetime | None = None,
) -> list[Listed]:
    """The account's transactions of these kinds (any call) that no transaction reverses yet,
    posted after transaction `after_id` (and at or after `posted_since`), in posting order."""
    reversal = ledger_transactions.alias("reversal")
    rows = await connection.execute(
        select(
            ledger_transactions.c.transaction_id,
            ledger_transactions.c.idempotency_key,
            ledger_transactions.c.kind,
            ledger_transactions.c.call_sid,
            ledger_transactions.c.posted_at,
        )
        .outerjoin(reversal, reversal.c.reverses_key == ledger_transactions.c.idempotency_key)
        .where(
            ledger_transactions.c.account_id == account_id,
            ledger_transactions.c.kind.in_(kinds),
            ledger_transactions.c.transaction_id > after_id,
            reversal.c.transaction_id.is_(None),
            *([] if posted_since is None else [ledger_transactions.c.posted_at >= posted_since]),
        )
        .order_by(ledger_transactions.c.transaction_id)
    )
    return [Listed(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]


async def call_book_totals(
    connection: AsyncConnection, call_sid: str, *, excluding_kinds: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Net movement per book of everything posted for the call (reversals included), leaving
    out transactions of `excluding_kinds`."""
    query = (
        select(ledger_postings.c.book, func.sum(ledger_postings.c.amount))
        .join(
            ledger_transactions,
            ledger_transactions.c.transaction_id == ledger_postings.c.transaction_id,
        )
        .where(ledger_transactions.c.call_sid == call_sid)
        .group_by(ledger_postings.c.book)
    )
    if excluding_kinds:
        query = query.where(ledger_transactions.c.kind.not_in(excluding_kinds))
    return {book: int(total) for book, total in await connection.execute(query)}


async def list_transactions(
    connection: AsyncConnection,
    *,
    account_id: str | None,
    call_sid: str | None,
    since: dt.datetime | None,
    after_id: int,
    limit: int,
) -> list[dict[str, Any]]:
    """Transactions with their postings, oldest first, after a transaction id (a cursor)."""
    query = select(ledger_transactions).where(ledger_transactions.c.transaction_id > after_id)
    if account_id is not None:
        query = query.where(ledger_transactions.c.account_id == account_id)
    if call_sid is not None:
        query = query.where(ledger_transactions.c.call_sid == call_sid)
    if since is not None:
        query = query.where(ledger_transactions.c.posted_at >= since)
    rows = (
        await connection.execute(query.order_by(ledger_transactions.c.transaction_id).limit(limit))
    ).all()
    postings: dict[int, list[dict[str, Any]]] = {row.transaction_id: [] for row in rows}
    if rows:
        for posting in await connection.execute(
            select(ledger_postings)
            .where(ledger_postings.c.transaction_id.in_(postings))
            .order_by(ledger_postings.c.posting_id)
        ):
            postings[posting.transaction_id].append(
                {"book": posting.book, "unit": posting.unit, "amount": int(posting.amount)}
            )
    return [
        {
            "transaction_id": row.transaction_id,
            "key": row.idempotency_key,
            "kind": row.kind,
            "account_id": row.account_id,
            "call_sid": row.call_sid,
            "memo": row.memo,
            "reverses_key": row.reverses_key,
            "posted_at": row.posted_at.isoformat(),
            "postings": postings[row.transaction_id],
        }
        for row in rows
    ]


async def net_incidents(connection: AsyncConnection, call_sid: str) -> int:
    """Incidents charged on the call, less those reversed (waived)."""
    reversal = ledger_transactions.alias("reversal")
    value = await connection.scalar(
        select(func.count())
        .select_from(ledger_transactions)
        .outerjoin(reversal, reversal.c.reverses_key == ledger_transactions.c.idempotency_key)
        .where(
            ledger_transactions.c.call_sid == call_sid,
            ledger_transactions.c.kind.in_(INCIDENT_KINDS),
            reversal.c.transaction_id.is_(None),
        )
    )
    return int(value or 0)


async def allow_debt(connection: AsyncConnection, account_id: str) -> None:
    """Let the account's deposit go below zero (`on_exhausted = "allow_debt"`) and flag the
    account as in debt."""
    await connection.execute(
        update(ledger_books)
        .where(ledger_books.c.book == ledger.deposit_book(account_id))
        .values(allow_negative=True)
    )
    await connection.execute(
        update(accounts)
        .where(accounts.c.account_id == account_id, ~accounts.c.debt_flagged)
        .values(debt_flagged=True)
    )
