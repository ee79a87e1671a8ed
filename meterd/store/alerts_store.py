"""Alerts to the desk: where each account's balances stand against their thresholds, and the
alerts waiting to be delivered (meterd/services/alerts.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, and_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.store.schema import (
    account_thresholds,
    accounts,
    alert_states,
    alerts,
    ledger_books,
)
from meterd.store.sql import insert_ignoring_conflict


async def record(
    connection: AsyncConnection,
    *,
    event_id: str,
    account_id: str,
    kind: str,
    body_json: str,
    now: dt.datetime,
) -> bool:
    """Record an alert once (by `event_id`); True if it is new."""
    statement = insert_ignoring_conflict(
        connection,
        alerts,
        {
            "event_id": event_id,
            "account_id": account_id,
            "kind": kind,
            "body_json": body_json,
            "created_at": now,
            "attempts": 0,
            "next_attempt_at": now,
            "delivered_at": None,
            "failed_at": None,
            "last_error": None,
        },
        ["event_id"],
    ).returning(alerts.c.alert_id)
    return (await connection.execute(statement)).scalar_one_or_none() is not None


async def due(connection: AsyncConnection, now: dt.datetime, limit: int) -> list[Row[Any]]:
    """Alerts neither delivered nor given up whose next attempt is due, oldest first."""
    rows = await connection.execute(
        select(alerts)
        .where(
            alerts.c.delivered_at.is_(None),
            alerts.c.failed_at.is_(None),
            alerts.c.next_attempt_at <= now,
        )
        .order_by(alerts.c.alert_id)
        .limit(limit)
    )
    return list(rows.all())


async def claim(
    connection: AsyncConnection, alert_id: int, attempts_read: int, retry_at: dt.datetime
) -> bool:
    """Count one more attempt and move the next one to `retry_at` (so a crash mid-send retries
    then), if the alert is still as read; False if another daemon got there first."""
    claimed = await connection.execute(
        update(alerts)
        .where(
            alerts.c.alert_id == alert_id,
            alerts.c.attempts == attempts_read,
            alerts.c.delivered_at.is_(None),
        )
        .values(attempts=attempts_read + 1, next_attempt_at=retry_at)
    )
    return claimed.rowcount == 1


async def mark_delivered(connection: AsyncConnection, alert_id: int, at: dt.datetime) -> None:
    await connection.execute(
        update(alerts).where(alerts.c.alert_id == alert_id).values(delivered_at=at)
    )


async def mark_not_delivered(
    connection: AsyncConnection, alert_id: int, error: str, *, given_up_at: dt.datetime | None
) -> None:
    await connection.execute(
        update(alerts)
        .where(alerts.c.alert_id == alert_id)
        .values(last_error=error, failed_at=given_up_at)
    )


async def balances_and_thresholds(connection: AsyncConnection) -> list[Any]:
    """Every account's bank and deposit balances, its own thresholds (null: the default) and
    where each balance stood (null: never looked at): account_id, currency, bank, deposit,
    alert_bank_minutes_below, alert_deposit_minor_below, bank_below, deposit_below."""
    bank = ledger_books.alias("bank")
    deposit = ledger_books.alias("deposit")
    bank_state = alert_states.alias("bank_state")
    deposit_state = alert_states.alias("deposit_state")
    rows = await connection.execute(
        select(
            accounts.c.account_id,
            accounts.c.currency,
            bank.c.balance.label("bank"),
            deposit.c.balance.label("deposit"),
            account_thresholds.c.alert_bank_minutes_below,
            account_thresholds.c.alert_deposit_minor_below,
            bank_state.c.below.label("bank_below"),
            deposit_state.c.below.label("deposit_below"),
        )
        .outerjoin(account_thresholds, account_thresholds.c.account_id == accounts.c.account_id)
        .outerjoin(bank, bank.c.book == "customer:" + accounts.c.account_id + ":bank")
        .outerjoin(deposit, deposit.c.book == "customer:" + accounts.c.account_id + ":deposit")
        .outerjoin(
            bank_state,
            and_(bank_state.c.account_id == accounts.c.account_id, bank_state.c.balance == "bank"),
        )
        .outerjoin(
            deposit_state,
            and_(
                deposit_state.c.account_id == accounts.c.account_id,
                deposit_state.c.balance == "deposit",
            ),
        )
        .order_by(accounts.c.account_id)
    )
    return list(rows.all())


async def first_seen(
    connection: AsyncConnection, account_id: str, balance: str, below: bool, now: dt.datetime
) -> None:
    """Where a balance stands when meterd first looks at it (no alert: nothing crossed)."""
    await connection.execute(
        insert_ignoring_conflict(
            connection,
            alert_states,
            {"account_id": account_id, "balance": balance, "below": below, "changed_at": now},
            ["account_id", "balance"],
        )
    )


async def moved(
    connection: AsyncConnection, account_id: str, balance: str, below: bool, now: dt.datetime
) -> bool:
    """Move where a balance stands; True only for the one transaction that moved it (so a
    crossing is told once, whichever meterd sees it first)."""
    result = await connection.execute(
        update(alert_states)
        .where(
            alert_states.c.account_id == account_id,
            alert_states.c.balance == balance,
            alert_states.c.below != below,
        )
        .values(below=below, changed_at=now)
    )
    return result.rowcount == 1


async def alerts_of(connection: AsyncConnection, account_ids: Sequence[str]) -> list[Row[Any]]:
    """The alerts recorded for these accounts, oldest first (for tests and the operator)."""
    rows = await connection.execute(
        select(alerts).where(alerts.c.account_id.in_(list(account_ids))).order_by(alerts.c.alert_id)
    )
    return list(rows.all())
