"""Defect 14: system books keep no running balance, so no transaction ever row-locks one.

Every posting used to update its book's `balance` row, including `system:minutes:used`, which
every minute touches; two transactions touching system books in opposite orders then deadlocked
on PostgreSQL. Since migration 0006 only customer books' balances move (their CHECK is what
refuses a balance below zero); a system book's balance is the sum of its postings and its stored
`balance` stays 0. On SQLite the write transaction is exclusive, so the same transactions simply
run one after the other: the test runs there too and checks the same outcome.
"""

from __future__ import annotations

import asyncio
import random

from sqlalchemy import select, text

from meterd.core import ledger
from meterd.core.ledger import MINUTES
from meterd.services.ledger_check import check_ledger
from meterd.store import ledger_store
from meterd.store.database import Database
from meterd.store.schema import ledger_books

from .helpers import NOW, make_account

# A lock wait of this long is a failure: nothing in these transactions should wait at all.
STEP_TIMEOUT_SECONDS = 15


def _transfer(key: str, from_book: str, to_book: str, account_id: str) -> ledger.Transaction:
    return ledger.transfer(
        key,
        "test_transfer",
        unit=MINUTES,
        amount=1,
        from_book=from_book,
        to_book=to_book,
        account_id=account_id,
    )


async def _stored_balances(database: Database) -> dict[str, int]:
    async with database.read() as connection:
        rows = await connection.execute(select(ledger_books.c.book, ledger_books.c.balance))
        return {row.book: int(row.balance) for row in rows}


async def test_opposite_orders_on_system_books_do_not_deadlock(database):
    """T1 touches `minutes:used` then `minutes:issued`; T2 `minutes:issued` then
    `minutes:used`, each holding its first step while the other takes its own (PostgreSQL;
    SQLite runs them one after the other). Under the old trigger, T1's second step waited
    for T2's row lock on `minutes:issued` and T2's for T1's on `minutes:used`: deadlock."""
    await make_account(database, "A1")  # 45 included minutes each
    await make_account(database, "B1")
    interleave = database.dialect == "postgresql"
    first_steps_done = [asyncio.Event(), asyncio.Event()]

    async def run(index: int, steps: list[ledger.Transaction]) -> None:
        async with database.write() as connection:
            await ledger_store.post(connection, steps[0], NOW)
            first_steps_done[index].set()
            if interleave:  # both first steps are in, uncommitted, before either goes on
                await first_steps_done[1 - index].wait()
            await ledger_store.post(connection, steps[1], NOW)

    bank_a, bank_b = ledger.bank_book("A1"), ledger.bank_book("B1")
    t1 = [
        _transfer("t1:use", bank_a, ledger.MINUTES_USED, "A1"),
        _transfer("t1:issue", ledger.MINUTES_ISSUED, bank_a, "A1"),
    ]
    t2 = [
        _transfer("t2:issue", ledger.MINUTES_ISSUED, bank_b, "B1"),
        _transfer("t2:use", bank_b, ledger.MINUTES_USED, "B1"),
    ]
    await asyncio.wait_for(asyncio.gather(run(0, t1), run(1, t2)), timeout=2 * STEP_TIMEOUT_SECONDS)

    stored = await _stored_balances(database)
    assert stored[bank_a] == 45 and stored[bank_b] == 45
    assert stored[ledger.MINUTES_USED] == 0 and stored[ledger.MINUTES_ISSUED] == 0
    async with database.read() as connection:
        assert await ledger_store.balance(connection, ledger.MINUTES_USED) == 2
        assert await ledger_store.balance(connection, ledger.MINUTES_ISSUED) == -(45 + 45 + 2)
        assert await ledger_store.balances(
            connection, [ledger.MINUTES_USED, ledger.MINUTES_ISSUED, bank_a]
        ) == {ledger.MINUTES_USED: 2, ledger.MINUTES_ISSUED: -92, bank_a: 45}
    report = await check_ledger(database)
    assert report.ok, report.breaches


async def test_many_transactions_touching_system_books_in_random_orders_all_commit(database):
    """Eight concurrent writers, 25 transactions each, every transaction one customer's own
    book plus three system books in a random order, several postings per transaction."""
    writers, per_writer = 8, 25
    for index in range(writers):
        await make_account(database, f"W{index}")
    system = [ledger.MINUTES_USED, ledger.MINUTES_ISSUED, ledger.MINUTES_UNBANKED]
    rng = random.Random(14)

    async def writer(index: int) -> None:
        account = f"W{index}"
        bank = ledger.bank_book(account)
        for n in range(per_writer):
            order = rng.sample(system, k=len(system))
            async with database.write() as connection:
                for step, book in enumerate(order):
                    key = f"w{index}:{n}:{step}"
                    if step % 2:
                        transaction = _transfer(key, book, bank, account)
                    else:
                        transaction = _transfer(key, bank, book, account)
                    await ledger_store.post(connection, transaction, NOW)
                    await asyncio.sleep(0)  # let the other writers interleave

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(writers))), timeout=120)
    stored = await _stored_balances(database)
    for index in range(writers):
        assert stored[ledger.bank_book(f"W{index}")] == 45 - per_writer  # 2 out, 1 in, each
    assert all(stored[book] == 0 for book in system)
    report = await check_ledger(database)
    assert report.ok, report.breaches


async def test_a_posting_to_a_system_book_leaves_its_stored_balance_at_zero(database):
    await make_account(database, "A1")
    async with database.write() as connection:
        await ledger_store.post(connection, ledger.deposit("A1", "USD", 700, "wire-1"), NOW)
        assert await ledger_store.balance(connection, ledger.deposit_book("A1")) == 700
        received = ledger.deposits_received_book("USD")
        assert await ledger_store.balance(connection, received) == -700
    stored = await _stored_balances(database)
    assert stored[ledger.deposit_book("A1")] == 700
    assert stored[received] == 0 and stored[ledger.MINUTES_ISSUED] == 0


async def test_ledger_check_names_a_system_book_holding_a_stored_balance(database):
    await make_account(database, "A1")
    async with database.write() as connection:
        await connection.execute(
            text("UPDATE ledger_books SET balance = 45 WHERE book = 'system:minutes:issued'")
        )
        await connection.execute(
            text("UPDATE ledger_books SET kind = 'system' WHERE book = 'customer:A1:deposit'")
        )
    report = await check_ledger(database)
    assert [(b.invariant, b.detail) for b in report.breaches] == [
        (
            "system book keeps no stored balance",
            "book system:minutes:issued holds 45, but a system book's stored balance stays 0 "
            "(its balance is the sum of its postings)",
        ),
        (
            "book kind matches its name",
            "book customer:A1:deposit is of kind system (account A1); kind 'system', with no "
            "account, is for exactly the books named system:...",
        ),
    ]
