"""An account's statement as JSON, CSV and a printable HTML page. Pure, no I/O.

Money is written as the nightly usage writes it: decimal text in the account's currency, and in
JSON `<name>_minor` beside it. The CSV is one table: an `opening` line, one line per business
day, a `total` line and a `closing` line, each with the three balances (on the day lines: the
day's closing balances), every movement column and, last, the settled calls by direction
(`inbound_calls`, `outbound_calls`: per day on a day line, the period's on the total line)."""

from __future__ import annotations

import csv
import html
import io
from typing import Any

from meterd.core.money import format_minor
from meterd.core.usage.render import ACCOUNT_COLUMNS, Cell
from meterd.core.usage.statement import BALANCES, DIRECTION_COUNTS, SUMMED, Statement

_MONEY = {name for name, kind in ACCOUNT_COLUMNS if kind is Cell.MONEY}
_BALANCE_NAMES = tuple(BALANCES)  # bank_minutes, deposit_minor, receivable_minor


def _money(statement: Statement, name: str, value: int) -> str | int:
    money = name in _MONEY or name.endswith("_minor")
    return format_minor(value, statement.currency) if money else value


def _with_minor(statement: Statement, values: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in _MONEY:
            out[name] = format_minor(value, statement.currency)
            out[f"{name}_minor"] = value
        else:
            out[name] = value
    return out


def statement_json(statement: Statement) -> dict[str, Any]:
    return {
        "account_id": statement.account_id,
        "currency": statement.currency,
        "from": statement.first_day.isoformat(),
        "to": statement.last_day.isoformat(),
        "opening": statement.opening,
        "closing": statement.closing,
        "totals": _with_minor(statement, statement.totals) | statement.directions,
        "reconciled": True,
        "days": [
            {"business_day": day["business_day"], **_with_minor(statement, _numbers(day))}
            for day in statement.days
        ],
        "calls": statement.calls,
    }


def _numbers(day: dict[str, int | str]) -> dict[str, int]:
    return {k: v for k, v in day.items() if isinstance(v, int)}


def statement_csv(statement: Statement) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        ["line", "business_day", "currency", *_BALANCE_NAMES, *SUMMED, *DIRECTION_COUNTS]
    )

    def line(kind: str, day: str, balances: dict[str, int], moved: dict[str, int]) -> None:
        writer.writerow(
            [
                kind,
                day,
                statement.currency,
                *(_money(statement, b, balances[b]) for b in _BALANCE_NAMES),
                *(_money(statement, n, moved[n]) if n in moved else "" for n in SUMMED),
                *(moved.get(n, "") for n in DIRECTION_COUNTS),
            ]
        )

    line("opening", statement.first_day.isoformat(), statement.opening, {})
    for day, closing, directions in zip(
        statement.days, statement.day_closings, statement.day_directions, strict=True
    ):
        line("day", str(day["business_day"]), closing, _numbers(day) | directions)
    line("total", "", statement.closing, statement.totals | statement.directions)
    line("closing", statement.last_day.isoformat(), statement.closing, {})
    return out.getvalue()


_CALL_COLUMNS = (
    ("business_day", "Day"),
    ("call_sid", "Call"),
    ("direction", "Direction"),
    ("plan", "Plan"),
    ("agents", "Agents"),
    ("agent_minutes", "Agent-minutes"),
    ("bank_used_minutes", "Bank minutes"),
    ("deposit_used", "Deposit"),
    ("card_charges", "Card"),
    ("receivable_charged", "Owed"),
    ("incidents", "Incidents"),
    ("waiver_reason", "Waived"),
)


def statement_html(statement: Statement) -> str:
    """A page to read and print: balances, movements, the calls."""
    e = html.escape
    name = {
        "bank_minutes": "Banked minutes",
        "deposit_minor": "Deposit",
        "receivable_minor": "Owed",
    }
    rows = "".join(
        f"<tr><th scope='row'>{name[b]}</th>"
        f"<td>{e(str(_money(statement, b, statement.opening[b])))}</td>"
        f"<td>{e(str(_money(statement, b, statement.closing[b])))}</td></tr>"
        for b in _BALANCE_NAMES
    )
    movements = "".join(
        f"<tr><th scope='row'>{e(n)}</th><td>{e(str(_money(statement, n, v)))}</td></tr>"
        for n, v in statement.totals.items()
        if v
    )
    head = "".join(f"<th scope='col'>{e(label)}</th>" for _, label in _CALL_COLUMNS)
    calls = "".join(
        "<tr>"
        + "".join(f"<td>{e(str(call.get(key) or ''))}</td>" for key, _ in _CALL_COLUMNS)
        + "</tr>"
        for call in statement.calls
    )
    counted = statement.directions
    summary = (
        f"{counted['inbound_calls'] + counted['outbound_calls']} calls settled: "
        f"{counted['inbound_calls']} inbound, {counted['outbound_calls']} outbound (callbacks)."
    )
    title = (
        f"Statement of {statement.account_id}, {statement.first_day.isoformat()} to "
        f"{statement.last_day.isoformat()} ({statement.currency})"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>"
        "body{font-family:sans-serif;color:#111;margin:2rem}"
        "table{border-collapse:collapse;margin-bottom:1.5rem}"
        "th,td{border:1px solid #555;padding:.25rem .5rem;text-align:left}"
        "@media print{body{margin:0}}</style></head><body>"
        f"<h1>{e(title)}</h1>"
        "<h2>Balances</h2><table><thead><tr><th scope='col'></th>"
        "<th scope='col'>Opening</th><th scope='col'>Closing</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        "<h2>Movements in the period</h2><table><tbody>"
        f"{movements or '<tr><td>none</td></tr>'}</tbody></table>"
        f"<h2>Calls</h2><p id='calls-by-direction'>{e(summary)}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{calls}</tbody></table>"
        "<p>Opening + movements = closing, in minutes and in money; each day's figures are "
        "the nightly usage's.</p></body></html>"
    )
