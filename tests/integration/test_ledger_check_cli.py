"""`meterd ledger check`: passes on a healthy ledger, names the breach on a tampered one."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from meterd.core import ledger
from meterd.store import ledger_store
from tests.e2e.daemon import run_cli

from .helpers import NOW, make_account, use_minutes


async def _tamper(database, statements: list[str]) -> None:
    async with database.write() as connection:
        for statement in statements:
            await connection.execute(text(statement))


async def _healthy_ledger(database) -> None:
    await make_account(database, "A1")
    async with database.write() as connection:
        await ledger_store.post(connection, ledger.deposit("A1", "USD", 500, "r1"), NOW)
        await ledger_store.post(connection, use_minutes("A1", 3, "call:CA1:minutes"), NOW)


def _check(database_url, tmp_path):
    return run_cli(
        ["ledger", "check"],
        {"METERD_DATABASE_URL": database_url, "METERD_STATE_DIR": str(tmp_path)},
        tmp_path,
    )


async def test_ledger_check_passes_on_a_healthy_ledger(database, database_url, tmp_path):
    await _healthy_ledger(database)
    result = _check(database_url, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked 3 transactions, 6 postings" in result.stdout
    assert "ledger OK" in result.stdout


def _drop_guard(dialect: str) -> str:
    if dialect == "sqlite":
        return "DROP TRIGGER ledger_postings_no_update"
    return "ALTER TABLE ledger_postings DISABLE TRIGGER ledger_postings_append_only"


async def test_ledger_check_names_a_posting_changed_behind_its_back(
    database, database_url, tmp_path
):
    await _healthy_ledger(database)
    await _tamper(
        database,
        [
            _drop_guard(database.dialect),
            "UPDATE ledger_postings SET amount = 900 WHERE book = 'customer:A1:deposit'",
        ],
    )
    result = _check(database_url, tmp_path)
    assert result.returncode == 1
    assert "BREACH [transaction balances]" in result.stdout
    assert "sums to 400 USD, not 0" in result.stdout
    assert (
        "BREACH [balance equals the sum of postings] book customer:A1:deposit holds 500 "
        "but its postings sum to 900"
    ) in result.stdout


@pytest.mark.parametrize(
    ("statement", "says"),
    [
        (
            "UPDATE ledger_books SET balance = balance + 7 WHERE book = 'customer:A1:bank'",
            "book customer:A1:bank holds 49 but its postings sum to 42",
        ),
        (
            "UPDATE ledger_books SET allow_negative = TRUE, balance = -1 "
            "WHERE book = 'customer:A1:deposit'",
            "customer:A1:deposit holds -1",
        ),
    ],
)
async def test_ledger_check_names_a_balance_changed_behind_its_back(
    database, database_url, tmp_path, statement, says
):
    await _healthy_ledger(database)
    await _tamper(database, [statement])
    result = _check(database_url, tmp_path)
    assert result.returncode == 1
    assert says in result.stdout
