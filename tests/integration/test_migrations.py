"""The schema comes only from the migrations, and they agree with the query metadata."""

from __future__ import annotations

import contextlib

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

import meterd.store.usage_schema  # noqa: F401
from meterd.core import ledger
from meterd.services.ledger_check import check_ledger
from meterd.store import accounts_store, ledger_store
from meterd.store.database import MIGRATIONS_DIR, open_database
from meterd.store.schema import ledger_books, metadata

from .helpers import NOW, make_account, use_deposit, use_minutes


async def test_migrated_schema_matches_the_tables_the_code_queries(database):
    def differences(connection):
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    async with database.read() as connection:
        diff = await connection.run_sync(differences)
    assert diff == []


async def test_upgrading_twice_changes_nothing(database, database_url):
    again = await open_database(database_url)
    try:
        async with again.read() as connection:
            version = (
                await connection.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar_one()
        assert version == "0009"
    finally:
        await again.close()


def _upgrade_to(connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def _stored_balances(database) -> dict[str, int]:
    async with database.read() as connection:
        rows = await connection.execute(select(ledger_books.c.book, ledger_books.c.balance))
        return {row.book: int(row.balance) for row in rows}


async def _account_at_0005(database, account_id: str) -> None:
    """`make_account` on a database at 0005: the account is written as 0005 holds it (committed),
    and the account view read afterwards needs a table of 0007 (account_thresholds)."""
    with contextlib.suppress(DBAPIError):
        await make_account(database, account_id)
    async with database.read() as connection:
        assert await accounts_store.account_exists(connection, account_id)


async def test_0006_stops_system_balances_and_keeps_customer_balances(database_url):
    """A ledger written under 0005 (every book's balance kept by the trigger), upgraded: system
    books' stored balances become 0 and stay 0, customer books keep theirs and go on moving,
    every balance still reads the same, and `meterd ledger check` passes."""
    database = await open_database(database_url, upgrade=False)
    try:
        async with database.write() as connection:
            await connection.run_sync(_upgrade_to, "0005")
        await _account_at_0005(database, "A1")  # 45 included minutes
        await _account_at_0005(database, "B1")
        async with database.write() as connection:
            await ledger_store.post(connection, ledger.deposit("A1", "USD", 900, "wire-1"), NOW)
            await ledger_store.post(connection, use_minutes("A1", 5, "call:CA1:minutes"), NOW)
            await ledger_store.post(connection, use_deposit("A1", 300, "call:CA1:money"), NOW)
            await ledger_store.post(connection, use_minutes("B1", 2, "call:CB1:minutes"), NOW)
        system = [
            ledger.MINUTES_ISSUED,
            ledger.MINUTES_USED,
            ledger.deposits_received_book("USD"),
            ledger.usage_revenue_book("USD"),
        ]
        before = await _stored_balances(database)
        assert [before[book] for book in system] == [-90, 7, -900, 300]  # kept by 0005's trigger
        async with database.read() as connection:
            readings = await ledger_store.balances(connection, list(before))

        async with database.write() as connection:
            await connection.run_sync(_upgrade_to, "head")

        after = await _stored_balances(database)
        assert {book: after[book] for book in system} == dict.fromkeys(system, 0)
        customer = {book: value for book, value in before.items() if book.startswith("customer:")}
        assert {book: after[book] for book in customer} == customer
        assert customer[ledger.bank_book("A1")] == 40 and customer[ledger.deposit_book("A1")] == 600
        async with database.read() as connection:
            assert await ledger_store.balances(connection, list(before)) == readings
        report = await check_ledger(database)
        assert report.ok, report.breaches

        # and from now on: customer books move, system books do not
        async with database.write() as connection:
            await ledger_store.post(connection, use_minutes("A1", 3, "call:CA2:minutes"), NOW)
        later = await _stored_balances(database)
        assert later[ledger.bank_book("A1")] == 37 and later[ledger.MINUTES_USED] == 0
        async with database.read() as connection:
            assert await ledger_store.balance(connection, ledger.MINUTES_USED) == 10
        assert (await check_ledger(database)).ok
    finally:
        await database.close()
