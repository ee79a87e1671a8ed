"""Auto top-up: which accounts have fallen below their threshold, and what was bought for them
(meterd/services/auto_top_up.py)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.store.payments_store import PaymentStatus
from meterd.store.repositories import CARD_PURCHASE_KINDS
from meterd.store.schema import account_thresholds, accounts, ledger_books, payment_operations

KEY_PREFIX = "account:{account_id}:auto-top-up:"


def key_prefix(account_id: str) -> str:
    return KEY_PREFIX.format(account_id=account_id)


async def below_threshold(connection: AsyncConnection) -> list[str]:
    """Accounts with auto top-up on, a card on file, and fewer banked minutes than their
    threshold, in account order."""
    bank = ledger_books.alias("bank")
    threshold = account_thresholds.c.auto_top_up_below_minutes
    rows = await connection.scalars(
        select(accounts.c.account_id)
        .join(account_thresholds, account_thresholds.c.account_id == accounts.c.account_id)
        .join(bank, bank.c.book == "customer:" + accounts.c.account_id + ":bank")
        .where(threshold > 0, accounts.c.card_on_file.is_not(None), bank.c.balance < threshold)
        .order_by(accounts.c.account_id)
    )
    return list(rows.all())


async def bought(connection: AsyncConnection, account_id: str, since: dt.datetime) -> int:
    """Auto top-ups of the account recorded after `since` (whatever became of them)."""
    operations = payment_operations.c
    count = await connection.scalar(
        select(func.count()).where(
            operations.account_id == account_id,
            operations.operation_key.startswith(key_prefix(account_id), autoescape=True),
            operations.created_at > since,
        )
    )
    return int(count or 0)


async def all_bought(connection: AsyncConnection, account_id: str) -> int:
    operations = payment_operations.c
    count = await connection.scalar(
        select(func.count()).where(
            operations.account_id == account_id,
            operations.operation_key.startswith(key_prefix(account_id), autoescape=True),
        )
    )
    return int(count or 0)


async def latest_purchase_failed(connection: AsyncConnection, account_id: str) -> bool:
    """The account's latest card purchase (a block or an authorisation, by any call or by auto
    top-up) failed: a decline nobody has resolved by a purchase that succeeded since."""
    operations = payment_operations.c
    last: Any = (
        await connection.execute(
            select(operations.status)
            .where(
                operations.account_id == account_id,
                operations.kind.in_(CARD_PURCHASE_KINDS),
                operations.status.in_((PaymentStatus.SUCCEEDED, PaymentStatus.FAILED)),
            )
            .order_by(operations.completed_at.desc(), operations.operation_id.desc())
            .limit(1)
        )
    ).one_or_none()
    return last is not None and last.status == PaymentStatus.FAILED
