"""Rates with an effective time. A per-minute deduction uses the rate in force when the minute
was taken, an incident the price in force at completion, a card block the price when charged.

The configured rates (`rate_per_agent_minute_minor`, `incident_price_minor`,
`block_price_minor`) are in force from the beginning of time, in every currency; rates added
through the admin API override them from their `effective_from`, per currency.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.clock import Clock
from meterd.core.money import MONEY_MINOR_MAX
from meterd.services import validation as v
from meterd.services.errors import Conflict, InvalidRequest
from meterd.services.research import parse_instant
from meterd.store.database import Database
from meterd.store.schema import rates


class RateKind(StrEnum):
    PER_AGENT_MINUTE = "per_agent_minute"
    INCIDENT = "incident"
    BLOCK = "block"


class RateBook:
    def __init__(self, database: Database, clock: Clock, defaults: dict[RateKind, int]) -> None:
        self._database = database
        self._clock = clock
        self._defaults = defaults

    async def rate_at(
        self, connection: AsyncConnection, kind: RateKind, currency: str, at: dt.datetime
    ) -> int:
        amount = await connection.scalar(
            select(rates.c.amount_minor)
            .where(
                rates.c.kind == kind.value,
                rates.c.currency == currency,
                rates.c.effective_from <= at,
            )
            .order_by(rates.c.effective_from.desc())
            .limit(1)
        )
        return self._defaults[kind] if amount is None else int(amount)

    async def add(self, body: Any) -> dict[str, Any]:
        body = v.require_object(body)
        v.only_fields(body, {"kind", "currency", "amount_minor", "effective_from"})
        try:
            kind = RateKind(body.get("kind"))
        except ValueError:
            raise InvalidRequest(
                f"kind must be one of {', '.join(k.value for k in RateKind)}"
            ) from None
        currency = v.required_text(body, "currency", max_chars=3)
        if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
            raise InvalidRequest("currency must be an ISO 4217 code such as USD")
        amount = body.get("amount_minor")
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int)
            or not 0 <= amount <= MONEY_MINOR_MAX
        ):
            raise InvalidRequest("amount_minor must be a whole number from 0 upwards")
        effective_from = parse_instant(body, "effective_from")
        try:
            async with self._database.write() as connection:
                await connection.execute(
                    insert(rates).values(
                        kind=kind.value,
                        currency=currency,
                        amount_minor=amount,
                        effective_from=effective_from,
                        created_at=self._clock(),
                    )
                )
        except IntegrityError:
            raise Conflict(
                f"a {kind.value} rate in {currency} is already in force from "
                f"{effective_from.isoformat()}"
            ) from None
        return {
            "kind": kind.value,
            "currency": currency,
            "amount_minor": amount,
            "effective_from": effective_from.isoformat(),
        }

    async def list(self) -> list[dict[str, Any]]:
        async with self._database.read() as connection:
            rows = await connection.execute(
                select(rates).order_by(rates.c.kind, rates.c.currency, rates.c.effective_from)
            )
        listed = [
            {
                "kind": kind.value,
                "currency": "*",
                "amount_minor": amount,
                "effective_from": None,
                "source": "config",
            }
            for kind, amount in self._defaults.items()
        ]
        listed += [
            {
                "kind": row.kind,
                "currency": row.currency,
                "amount_minor": row.amount_minor,
                "effective_from": row.effective_from.isoformat(),
                "source": "admin",
            }
            for row in rows
        ]
        return listed
