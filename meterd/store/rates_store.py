"""Rates added through the admin API, each in force from its `effective_from`, per currency.

One rate per kind, currency and instant: a second one is refused with `RateExists`.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from meterd.store.schema import rates
from meterd.store.transaction import Record, Transaction


class RateExists(Exception):
    """A rate of that kind and currency is already in force from that instant. Nothing was
    written (the caller's transaction must roll back)."""


async def rate_in_force(
    connection: Transaction, kind: str, currency: str, at: dt.datetime
) -> int | None:
    """The amount of the latest rate in force at `at`; None if none was added by then."""
    amount = await connection.scalar(
        select(rates.c.amount_minor)
        .where(
            rates.c.kind == kind,
            rates.c.currency == currency,
            rates.c.effective_from <= at,
        )
        .order_by(rates.c.effective_from.desc())
        .limit(1)
    )
    return None if amount is None else int(amount)


async def add_rate(
    connection: Transaction,
    *,
    kind: str,
    currency: str,
    amount_minor: int,
    effective_from: dt.datetime,
    now: dt.datetime,
) -> None:
    """`RateExists` if one is in force from that very instant."""
    try:
        await connection.execute(
            insert(rates).values(
                kind=kind,
                currency=currency,
                amount_minor=amount_minor,
                effective_from=effective_from,
                created_at=now,
            )
        )
    except IntegrityError as error:
        raise RateExists(f"{kind} {currency} {effective_from.isoformat()}") from error


async def all_rates(connection: Transaction) -> list[Record]:
    """Every added rate, by kind, currency and `effective_from`."""
    rows = await connection.execute(
        select(rates).order_by(rates.c.kind, rates.c.currency, rates.c.effective_from)
    )
    return list(rows.all())
