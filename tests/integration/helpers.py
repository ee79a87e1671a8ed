"""Small builders shared by the storage tests."""

from __future__ import annotations

import datetime as dt

from meterd.core import ledger
from meterd.core.ledger import MINUTES
from meterd.services.accounts import AccountService, AccountSettings
from meterd.store.database import Database

PIN_SECRET = "test-pin-secret-0123456789"
NOW = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)


def fixed_clock() -> dt.datetime:
    return NOW


def account_service(database: Database, included_minutes: int = 45) -> AccountService:
    return AccountService(
        database, AccountSettings("USD", included_minutes, PIN_SECRET), fixed_clock
    )


async def make_account(database: Database, account_id: str, **fields: object) -> dict:
    """A per_minute account in USD holding a Desktop licence, so 45 included minutes."""
    body = {
        "account_id": account_id,
        "name": f"Account {account_id}",
        "plan": "per_minute",
        "products": [{"product": "desktop", "kind": "license"}],
    }
    body.update(fields)
    return await account_service(database).create(body)


def use_minutes(account_id: str, minutes: int, key: str) -> ledger.Transaction:
    """Minutes taken from the bank for a call (the shape metering posts)."""
    return ledger.transfer(
        key,
        "minutes_used",
        unit=MINUTES,
        amount=minutes,
        from_book=ledger.bank_book(account_id),
        to_book=ledger.MINUTES_USED,
        account_id=account_id,
    )


def use_deposit(account_id: str, amount_minor: int, key: str) -> ledger.Transaction:
    """Money taken from the deposit for a call."""
    return ledger.transfer(
        key,
        "deposit_used",
        unit="USD",
        amount=amount_minor,
        from_book=ledger.deposit_book(account_id),
        to_book=ledger.usage_revenue_book("USD"),
        account_id=account_id,
    )
