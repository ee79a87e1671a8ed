"""An account's statement over a run of business days, from the nightly usage's own rows.

Pure, no I/O. A statement is the account's rows of the published daily usage, one per day,
added up: so its per-day figures are the nightly usage's by construction, and it reconciles
the way each day does (opening + movements = closing, in minutes and in money), checked here
again over the whole period, and day to day (each day opens where the day before closed).
A day the account does not appear in (it did not exist yet, or it held nothing and nothing moved:
the nightly usage leaves out an account whose books are all at zero with no movement) counts as
no movement and every balance at zero.

Each call line says its direction (inbound, or outbound: a callback the desk placed), and the
period counts its settled calls of each direction. Direction moves no money: the counts must add
up to the accounts files' `calls` (each day's settled rows of the calls file), checked like the
balances. A calls file published before it had `direction` has no such column: every call then
was inbound.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meterd.core.usage.render import ACCOUNT_COLUMNS, Cell

# Each balance: its opening and closing columns, and its movements with their signs, as the
# nightly usage's reconciliation rules (render.RECONCILIATION_RULES) read.
BALANCES: dict[str, tuple[str, str, tuple[tuple[str, int], ...]]] = {
    "bank_minutes": (
        "bank_opening_minutes",
        "bank_closing_minutes",
        (
            ("bank_included_minutes", 1),
            ("bank_granted_minutes", 1),
            ("bank_card_minutes", 1),
            ("bank_used_minutes", -1),
            ("bank_waived_minutes", 1),
        ),
    ),
    "deposit_minor": (
        "deposit_opening",
        "deposit_closing",
        (("deposit_paid_in", 1), ("deposit_used", -1), ("deposit_waived", 1)),
    ),
    "receivable_minor": (
        "receivable_opening",
        "receivable_closing",
        (("receivable_charged", 1), ("receivable_waived", -1)),
    ),
}
# the columns a period adds up: every count, minutes and money column but the balances
SUMMED = tuple(
    name
    for name, kind in ACCOUNT_COLUMNS
    if kind in (Cell.INT, Cell.MONEY)
    and not any(name in (opening, closing) for opening, closing, _ in BALANCES.values())
)


INBOUND, OUTBOUND = "inbound", "outbound"
DIRECTION_COUNTS = ("inbound_calls", "outbound_calls")  # the period's settled calls, by direction


class StatementDoesNotReconcile(Exception):
    """The days do not chain or a balance does not reconcile: never shown as a statement."""


@dataclass(frozen=True)
class Statement:
    account_id: str
    currency: str
    first_day: dt.date
    last_day: dt.date
    opening: dict[str, int]  # bank_minutes, deposit_minor, receivable_minor
    closing: dict[str, int]
    totals: dict[str, int]  # SUMMED, over the period
    days: list[dict[str, int | str]]  # per day: business_day and every SUMMED column
    day_closings: list[dict[str, int]]  # per day: its closing balances, as `closing`
    calls: list[Mapping[str, Any]]  # the calls file's rows of the account, day by day
    directions: dict[str, int]  # DIRECTION_COUNTS over the period
    day_directions: list[dict[str, int]]  # per day: DIRECTION_COUNTS


def with_direction(call: Mapping[str, Any]) -> dict[str, Any]:
    """A calls file's row with its direction; a file published before the column existed has
    none, and every call then was inbound."""
    return {**call, "direction": call.get("direction") or INBOUND}


def direction_counts(calls: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The settled calls among `calls` (rows of the calls files), by direction: what the
    accounts files count as `calls`, split."""
    settled = [with_direction(call)["direction"] for call in calls if call["status"] == "settled"]
    return {"inbound_calls": settled.count(INBOUND), "outbound_calls": settled.count(OUTBOUND)}


def zero_row(account_id: str, currency: str) -> dict[str, Any]:
    """The account's row on a day it had no movement and nothing on its books."""
    row: dict[str, Any] = {"account_id": account_id, "currency": currency}
    for name, kind in ACCOUNT_COLUMNS:
        if kind in (Cell.INT, Cell.MONEY):
            row[name] = 0
    return row


def build_statement(
    account_id: str,
    currency: str,
    rows_by_day: Sequence[tuple[dt.date, Mapping[str, Any]]],
    calls: Sequence[Mapping[str, Any]],
) -> Statement:
    """`rows_by_day`: consecutive business days, each with the account's row (integers: money
    in minor units), in order; `calls`: the account's rows of the days' calls files. Raises
    StatementDoesNotReconcile if a day does not open where the one before closed, the period's
    movements do not take the opening to the closing, or its calls by direction do not add up
    to its `calls`."""
    if not rows_by_day:
        raise ValueError("a statement covers at least one day")
    days = [day for day, _ in rows_by_day]
    if any(b - a != dt.timedelta(days=1) for a, b in itertools.pairwise(days)):
        raise ValueError("a statement's days are consecutive")
    for (_, before), (day, row) in itertools.pairwise(rows_by_day):
        for balance, (opens, closes, _) in BALANCES.items():
            if row[opens] != before[closes]:
                raise StatementDoesNotReconcile(
                    f"{balance} of {account_id} opens {day} at {row[opens]}, "
                    f"the day before closed at {before[closes]}"
                )
    totals = {name: sum(int(row[name]) for _, row in rows_by_day) for name in SUMMED}
    first, last = rows_by_day[0][1], rows_by_day[-1][1]
    opening = {balance: int(first[o]) for balance, (o, _, _) in BALANCES.items()}
    closing = {balance: int(last[c]) for balance, (_, c, _) in BALANCES.items()}
    for balance, (_, _, movements) in BALANCES.items():
        moved = sum(sign * totals[name] for name, sign in movements)
        if opening[balance] + moved != closing[balance]:
            raise StatementDoesNotReconcile(
                f"{balance} of {account_id}: opening {opening[balance]} + movements {moved} "
                f"!= closing {closing[balance]}"
            )
    per_day: list[dict[str, int | str]] = [
        {"business_day": day.isoformat(), **{name: int(row[name]) for name in SUMMED}}
        for day, row in rows_by_day
    ]
    day_closings = [
        {balance: int(row[c]) for balance, (_, c, _) in BALANCES.items()} for _, row in rows_by_day
    ]
    directions, day_directions = _directions(account_id, days, calls, totals["calls"])
    return Statement(
        account_id,
        currency,
        days[0],
        days[-1],
        opening,
        closing,
        totals,
        per_day,
        day_closings,
        [with_direction(call) for call in calls],
        directions,
        day_directions,
    )


def _directions(
    account_id: str, days: Sequence[dt.date], calls: Sequence[Mapping[str, Any]], settled: int
) -> tuple[dict[str, int], list[dict[str, int]]]:
    """The period's and each day's settled calls by direction; the period's must add up to the
    `settled` calls the accounts files count, or StatementDoesNotReconcile."""
    directions = direction_counts(calls)
    if sum(directions.values()) != settled:
        raise StatementDoesNotReconcile(
            f"calls of {account_id}: {directions['inbound_calls']} inbound + "
            f"{directions['outbound_calls']} outbound settled in the calls files, but the "
            f"accounts files count {settled}"
        )
    by_day: dict[str, list[Mapping[str, Any]]] = {}
    for call in calls:
        by_day.setdefault(call["business_day"], []).append(call)
    return directions, [direction_counts(by_day.get(day.isoformat(), [])) for day in days]
