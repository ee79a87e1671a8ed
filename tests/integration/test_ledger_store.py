"""The ledger tables on SQLite and PostgreSQL: once per key, balanced, append-only, never
negative."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from meterd.core import ledger
from meterd.services.ledger_check import check_ledger
from meterd.store import ledger_store
from meterd.store.database import Database
from meterd.store.schema import ledger_postings, ledger_transactions

from .helpers import NOW, make_account, use_deposit, use_minutes


async def _count(database: Database, table) -> int:
    async with database.read() as connection:
        return len((await connection.execute(select(table))).all())


async def test_same_key_same_content_posts_once_and_returns_the_earlier_result(database):
    await make_account(database, "A1")
    transaction = ledger.deposit("A1", "USD", 2500, "wire-1")
    async with database.write() as connection:
        first = await ledger_store.post(connection, transaction, NOW)
    async with database.write() as connection:
        again = await ledger_store.post(connection, transaction, NOW)
    assert not first.replayed and again.replayed
    assert again.transaction_id == first.transaction_id
    async with database.read() as connection:
        assert await ledger_store.balance(connection, ledger.deposit_book("A1")) == 2500
    assert (await check_ledger(database)).ok


async def test_same_key_other_content_is_refused_and_posts_nothing(database):
    await make_account(database, "A1")
    async with database.write() as connection:
        await ledger_store.post(connection, ledger.deposit("A1", "USD", 2500, "wire-1"), NOW)
    postings_before = await _count(database, ledger_postings)
    with pytest.raises(ledger_store.IdempotencyConflict):
        async with database.write() as connection:
            await ledger_store.post(connection, ledger.deposit("A1", "USD", 9999, "wire-1"), NOW)
    assert await _count(database, ledger_postings) == postings_before
    async with database.read() as connection:
        assert await ledger_store.balance(connection, ledger.deposit_book("A1")) == 2500


async def test_withdrawal_past_zero_is_refused_and_leaves_the_key_unclaimed(database):
    await make_account(database, "A1")  # 45 included minutes
    with pytest.raises(ledger_store.InsufficientBalance):
        async with database.write() as connection:
            await ledger_store.post(connection, use_minutes("A1", 46, "call:CA1:minutes"), NOW)
    async with database.read() as connection:
        assert await ledger_store.balance(connection, ledger.bank_book("A1")) == 45
        claimed = await connection.scalar(
            select(ledger_transactions.c.transaction_id).where(
                ledger_transactions.c.idempotency_key == "call:CA1:minutes"
            )
        )
    assert claimed is None
    async with database.write() as connection:  # the same key may then carry a smaller amount
        await ledger_store.post(connection, use_minutes("A1", 45, "call:CA1:minutes"), NOW)
    assert (await check_ledger(database)).ok


async def test_deposit_never_goes_below_zero(database):
    await make_account(database, "A1")
    with pytest.raises(ledger_store.InsufficientBalance):
        async with database.write() as connection:
            await ledger_store.post(connection, use_deposit("A1", 1, "call:CA1:deposit"), NOW)


async def test_a_book_that_allows_debt_may_go_negative(database):
    await make_account(database, "A1")
    async with database.write() as connection:
        await connection.execute(
            text("UPDATE ledger_books SET allow_negative = TRUE WHERE book = :book"),
            {"book": ledger.deposit_book("A1")},
        )
        await ledger_store.post(connection, use_deposit("A1", 300, "call:CA1:deposit"), NOW)
        assert await ledger_store.balance(connection, ledger.deposit_book("A1")) == -300
    assert (await check_ledger(database)).ok


async def test_reversal_restores_the_balance_and_keeps_both_transactions(database):
    await make_account(database, "A1")
    original = use_minutes("A1", 10, "call:CA1:minutes")
    async with database.write() as connection:
        await ledger_store.post(connection, original, NOW)
        await ledger_store.post(connection, ledger.reversal_of(original, "waiver:CA1"), NOW)
        assert await ledger_store.balance(connection, ledger.bank_book("A1")) == 45
    assert await _count(database, ledger_transactions) == 3  # included, use, reversal
    assert (await check_ledger(database)).ok


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_postings SET amount = amount + 1",
        "DELETE FROM ledger_postings",
        "UPDATE ledger_transactions SET memo = 'edited'",
        "DELETE FROM ledger_transactions",
    ],
)
async def test_database_refuses_edits_and_deletes_of_the_ledger(database, statement):
    await make_account(database, "A1")
    with pytest.raises(DBAPIError, match="append-only"):
        async with database.write() as connection:
            await connection.execute(text(statement))
    assert (await check_ledger(database)).ok


async def test_posting_to_a_missing_customer_book_is_refused(database):
    with pytest.raises(ledger_store.UnknownBook):
        async with database.write() as connection:
            await ledger_store.post(connection, ledger.deposit("nobody", "USD", 5, "r"), NOW)
    assert await _count(database, ledger_transactions) == 0


async def test_a_posting_in_the_wrong_unit_is_refused(database):
    await make_account(database, "A1")  # deposit in USD
    with pytest.raises(ledger_store.UnknownBook):
        async with database.write() as connection:
            await ledger_store.post(connection, ledger.deposit("A1", "EUR", 5, "r"), NOW)
