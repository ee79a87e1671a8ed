"""Accounts and their caller ids, in the database.

The database refuses a second account with the same id, a PIN (hash) another account holds, and
the same caller id twice for one account (accounts may share a number); a write it refuses raises
`AccountConflict`, which says which it was. The caller's transaction must then roll back
(`Database.write()` does).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from meterd.store.schema import account_thresholds, accounts, caller_ids
from meterd.store.sql import upsert
from meterd.store.transaction import Record, Transaction


class Clash(StrEnum):
    ACCOUNT_ID = "account_id"  # another account has that id
    PIN = "pin"  # another account has that PIN
    OTHER = "other"  # anything else the database refused (a caller id the account has, ...)


class AccountConflict(Exception):
    """The database refused the write: it clashes with another account. Nothing may be kept."""

    def __init__(self, clash: Clash, detail: str) -> None:
        super().__init__(detail)
        self.clash = clash
        self.detail = detail  # the database's own message


@contextmanager
def _refused_as_conflict() -> Iterator[None]:
    try:
        yield
    except IntegrityError as error:
        detail = str(error.orig)
        if "accounts_pkey" in detail or "accounts.account_id" in detail:
            clash = Clash.ACCOUNT_ID
        elif "pin_hash" in detail or "accounts_pin_hash" in detail:
            clash = Clash.PIN
        else:
            clash = Clash.OTHER
        raise AccountConflict(clash, detail) from error


async def account_exists(connection: Transaction, account_id: str) -> bool:
    found = await connection.scalar(
        select(accounts.c.account_id).where(accounts.c.account_id == account_id)
    )
    return found is not None


async def insert_account(
    connection: Transaction,
    *,
    account_id: str,
    name: str,
    plan: str,
    fallback_plan: str,
    valid_until: dt.date | None,
    currency: str,
    pin_hash: str | None,
    products_json: str,
    now: dt.datetime,
) -> None:
    """A new account, with no card on file and no debt. `AccountConflict` if it clashes."""
    with _refused_as_conflict():
        await connection.execute(
            insert(accounts).values(
                account_id=account_id,
                name=name,
                plan=plan,
                fallback_plan=fallback_plan,
                valid_until=valid_until,
                currency=currency,
                pin_hash=pin_hash,
                products_json=products_json,
                card_on_file=None,
                debt_flagged=False,
                created_at=now,
                updated_at=now,
            )
        )


async def update_account(connection: Transaction, account_id: str, **values: Any) -> bool:
    """Change the account's columns; False if there is no such account. `AccountConflict` if
    the change clashes."""
    with _refused_as_conflict():
        changed = await connection.execute(
            update(accounts).where(accounts.c.account_id == account_id).values(**values)
        )
    return bool(changed.rowcount)


async def add_caller_ids(connection: Transaction, account_id: str, numbers: list[str]) -> None:
    """`AccountConflict` if the account has one of them already."""
    if not numbers:
        return
    with _refused_as_conflict():
        await connection.execute(
            insert(caller_ids), [{"number": n, "account_id": account_id} for n in numbers]
        )


async def replace_caller_ids(connection: Transaction, account_id: str, numbers: list[str]) -> None:
    """The account's caller ids become `numbers` (`AccountConflict` if one is there twice)."""
    await connection.execute(delete(caller_ids).where(caller_ids.c.account_id == account_id))
    await add_caller_ids(connection, account_id, numbers)


async def get_account(connection: Transaction, account_id: str) -> Record | None:
    return (
        await connection.execute(select(accounts).where(accounts.c.account_id == account_id))
    ).one_or_none()


async def account_caller_ids(connection: Transaction, account_id: str) -> list[str]:
    """The account's caller ids, in order."""
    numbers = await connection.scalars(
        select(caller_ids.c.number)
        .where(caller_ids.c.account_id == account_id)
        .order_by(caller_ids.c.number)
    )
    return list(numbers.all())


async def account_ids(connection: Transaction) -> list[str]:
    """Every account's id, in order."""
    ids = await connection.scalars(select(accounts.c.account_id).order_by(accounts.c.account_id))
    return list(ids.all())


async def account_currency(connection: Transaction, account_id: str) -> str | None:
    """The account's currency; None if there is no such account."""
    currency = await connection.scalar(
        select(accounts.c.currency).where(accounts.c.account_id == account_id)
    )
    return None if currency is None else str(currency)


async def accounts_of_number(connection: Transaction, number: str) -> list[str]:
    """The accounts that list `number` as a caller ID (answering: one identifies the caller)."""
    rows = await connection.scalars(
        select(caller_ids.c.account_id).where(caller_ids.c.number == number)
    )
    return list(rows.all())


async def account_with_pin(connection: Transaction, pin_hash: str) -> str | None:
    """The account whose PIN hashes to `pin_hash`, if any."""
    return await connection.scalar(
        select(accounts.c.account_id).where(accounts.c.pin_hash == pin_hash)
    )


THRESHOLDS = ("alert_bank_minutes_below", "alert_deposit_minor_below", "auto_top_up_below_minutes")


async def thresholds(connection: Transaction, account_id: str) -> dict[str, int | None]:
    """The account's own thresholds (docs/alerts.md, auto top-up); null where not set."""
    row = (
        await connection.execute(
            select(account_thresholds).where(account_thresholds.c.account_id == account_id)
        )
    ).one_or_none()
    return {name: None if row is None else getattr(row, name) for name in THRESHOLDS}


async def set_thresholds(
    connection: Transaction, account_id: str, values: dict[str, int | None]
) -> None:
    """Set some of the account's thresholds, the others kept."""
    current = await thresholds(connection, account_id)
    await connection.execute(
        upsert(
            connection,
            account_thresholds,
            {"account_id": account_id, **current, **values},
            ["account_id"],
            list(THRESHOLDS),
        )
    )
