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

from meterd.clock import Clock
from meterd.core.money import MONEY_MINOR_MAX
from meterd.services import validation as v
from meterd.services.errors import Conflict, InvalidRequest
from meterd.services.research import parse_instant
from meterd.store import rates_store
from meterd.store.database import Database
from meterd.store.rates_store import RateExists
from meterd.store.transaction import Transaction


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
        self, connection: Transaction, kind: RateKind, currency: str, at: dt.datetime
    ) -> int:
        amount = await rates_store.rate_in_force(connection, kind.value, currency, at)
        return self._defaults[kind] if amount is None else amount

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
                await rates_store.add_rate(
                    connection,
                    kind=kind.value,
                    currency=currency,
                    amount_minor=amount,
                    effective_from=effective_from,
                    now=self._clock(),
                )
        except RateExists:
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
            rows = await rates_store.all_rates(connection)
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
