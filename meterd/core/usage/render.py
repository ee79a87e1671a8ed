"""The usage report's files, from reconciled rows.

- CSV: RFC 4180 (CRLF), UTF-8, a header row, ISO 8601 dates and UTC times, money as exact decimal
  text (`format_minor`) with the currency column beside, integers for counts, minutes and
  seconds, an empty cell where a value does not apply. A text cell that a spreadsheet would read
  as a formula (starting with = + - @ or a control character) is prefixed with an apostrophe.
- JSON: the accounts with the same names; money as decimal text and, beside it, `<name>_minor`
  (integer minor units, as everywhere in meterd's JSON). Never a float: rendering refuses one.
- Nothing in a file depends on when or where it was made, so regenerating a day gives the same
  bytes.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from meterd.core.money import format_minor
from meterd.core.usage.business_days import day_bounds
from meterd.core.usage.movements import TIED_COLUMNS
from meterd.core.usage.reconciliation import AccountUsage, CallUsage

__all__ = [
    "ACCOUNT_COLUMNS",
    "CALL_COLUMNS",
    "CALL_COLUMNS_BEFORE_DIRECTION",
    "Cell",
    "Columns",
    "call_csv_header",
    "call_csv_line",
    "call_csv_lines",
    "iso_utc",
    "render_accounts_csv",
    "render_accounts_json",
]


class Cell(StrEnum):
    TEXT = "text"
    INT = "int"
    MONEY = "money"
    DATE = "date"
    TIME = "time"


ACCOUNT_COLUMNS: tuple[tuple[str, Cell], ...] = (
    ("business_day", Cell.DATE),
    ("account_id", Cell.TEXT),
    ("currency", Cell.TEXT),
    ("calls", Cell.INT),
    ("agent_minutes", Cell.INT),
    ("hold_seconds", Cell.INT),
    ("research_seconds", Cell.INT),
    ("bank_opening_minutes", Cell.INT),
    ("bank_included_minutes", Cell.INT),
    ("bank_granted_minutes", Cell.INT),
    ("bank_card_minutes", Cell.INT),
    ("bank_used_minutes", Cell.INT),
    ("bank_waived_minutes", Cell.INT),
    ("bank_closing_minutes", Cell.INT),
    ("deposit_opening", Cell.MONEY),
    ("deposit_paid_in", Cell.MONEY),
    ("deposit_used", Cell.MONEY),
    ("deposit_waived", Cell.MONEY),
    ("deposit_closing", Cell.MONEY),
    ("receivable_opening", Cell.MONEY),
    ("receivable_charged", Cell.MONEY),
    ("receivable_waived", Cell.MONEY),
    ("receivable_closing", Cell.MONEY),
    ("card_charges", Cell.MONEY),
    ("card_refunds", Cell.MONEY),
    ("card_waived", Cell.MONEY),
    ("incidents", Cell.INT),
    ("incidents_waived", Cell.INT),
    ("waivers", Cell.INT),
    ("reconciled", Cell.TEXT),
)

CALL_COLUMNS: tuple[tuple[str, Cell], ...] = (
    ("business_day", Cell.DATE),
    ("call_sid", Cell.TEXT),
    ("account_id", Cell.TEXT),
    ("plan", Cell.TEXT),
    ("currency", Cell.TEXT),
    ("status", Cell.TEXT),
    ("started_at", Cell.TIME),
    ("ended_at", Cell.TIME),
    ("settled_at", Cell.TIME),
    ("agents", Cell.TEXT),
    ("hold_seconds", Cell.INT),
    ("active_seconds", Cell.INT),
    ("research_seconds", Cell.INT),
    ("billable_seconds", Cell.INT),
    ("call_agent_minutes", Cell.INT),
    ("agent_minutes", Cell.INT),
    ("bank_used_minutes", Cell.INT),
    ("deposit_used", Cell.MONEY),
    ("receivable_charged", Cell.MONEY),
    ("card_charges", Cell.MONEY),
    ("incidents", Cell.INT),
    ("bank_waived_minutes", Cell.INT),
    ("deposit_waived", Cell.MONEY),
    ("receivable_waived", Cell.MONEY),
    ("card_waived", Cell.MONEY),
    ("card_refunds", Cell.MONEY),
    ("incidents_waived", Cell.INT),
    ("waiver_reason", Cell.TEXT),
    ("direction", Cell.TEXT),  # inbound, or outbound for a callback (0009)
)
# The published files are a contract: a column is only ever added at the end. A day published
# before `direction` was added has these columns (every call then was inbound), and is rebuilt
# in them, so that its rebuild can prove the published bytes (`meterd.services.usage`).
CALL_COLUMNS_BEFORE_DIRECTION = CALL_COLUMNS[:-1]
Columns = Sequence[tuple[str, Cell]]  # a file's layout: its columns, in order

Value = int | str | dt.date | dt.datetime | None


def account_record(day: dt.date, account: AccountUsage) -> dict[str, Value]:
    """The account's row, as typed values (money in minor units); reconciled by now."""
    m = account.movements
    bank, deposit = account.balance("bank"), account.balance("deposit")
    receivable = account.balance("receivable")
    record: dict[str, Value] = {
        "business_day": day,
        "account_id": account.account_id,
        "currency": account.currency,
        "calls": account.calls,
        "agent_minutes": m.agent_minutes,
        "hold_seconds": account.hold_seconds,
        "research_seconds": account.research_seconds,
        "bank_opening_minutes": bank.opening,
        "bank_included_minutes": m.bank_included_minutes,
        "bank_granted_minutes": m.bank_granted_minutes,
        "bank_card_minutes": m.bank_card_minutes,
        "bank_used_minutes": m.bank_used_minutes,
        "bank_waived_minutes": m.bank_waived_minutes,
        "bank_closing_minutes": bank.closing,
        "deposit_opening": deposit.opening,
        "deposit_paid_in": m.deposit_paid_in,
        "deposit_used": m.deposit_used,
        "deposit_waived": m.deposit_waived,
        "deposit_closing": deposit.closing,
        "receivable_opening": -receivable.opening,
        "receivable_charged": m.receivable_charged,
        "receivable_waived": m.receivable_waived,
        "receivable_closing": -receivable.closing,
        "card_charges": m.card_charges,
        "card_refunds": m.card_refunds,
        "card_waived": m.card_waived,
        "incidents": m.incidents,
        "incidents_waived": m.incidents_waived,
        "waivers": account.waivers,
        "reconciled": "yes",
    }
    return record


def call_record(day: dt.date, call: CallUsage) -> dict[str, Value]:
    m, time = call.movements, call.time
    return {
        "business_day": day,
        "call_sid": call.call_sid,
        "account_id": call.account_id,
        "plan": call.plan,
        "currency": call.currency,
        "status": call.status.value,
        "started_at": call.started_at,
        "ended_at": call.ended_at,
        "settled_at": call.settled_at,
        "agents": None if time is None else " ".join(time.agents),
        "hold_seconds": None if time is None else time.hold_seconds,
        "active_seconds": None if time is None else time.active_seconds,
        "research_seconds": None if time is None else time.research_seconds,
        "billable_seconds": None if time is None else time.billable_seconds,
        "call_agent_minutes": None if time is None else time.agent_minutes,
        "agent_minutes": m.agent_minutes,
        "bank_used_minutes": m.bank_used_minutes,
        "deposit_used": m.deposit_used,
        "receivable_charged": m.receivable_charged,
        "card_charges": m.card_charges,
        "incidents": m.incidents,
        "bank_waived_minutes": m.bank_waived_minutes,
        "deposit_waived": m.deposit_waived,
        "receivable_waived": m.receivable_waived,
        "card_waived": m.card_waived,
        "card_refunds": m.card_refunds,
        "incidents_waived": m.incidents_waived,
        "waiver_reason": call.waiver_reason,
        "direction": call.direction,
    }


def iso_utc(instant: dt.datetime) -> str:
    """An instant as ISO 8601 in UTC to the second, e.g. 2026-11-20T15:00:00+00:00."""
    if instant.tzinfo is None:
        raise ValueError("a naive datetime cannot be rendered as UTC")
    return instant.astimezone(dt.UTC).isoformat(timespec="seconds")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def _text_cell(value: str) -> str:
    """Text as a spreadsheet shows it, never as a formula it would run."""
    return "'" + value if value.startswith(_FORMULA_START) else value


@functools.lru_cache(maxsize=4096, typed=True)
def _money_text(amount_minor: int, currency: str) -> str:
    # The same few amounts (0 most of all) fill most money cells of a day's report.
    return format_minor(amount_minor, currency)


def _csv_cell(kind: Cell, value: Value, currency: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # bool is an int: refused below too
        raise TypeError("a float has no place in a usage report")
    if kind is Cell.MONEY:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"money must be integer minor units, got {value!r}")
        return format_minor(value, currency)
    if kind is Cell.INT:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"expected an integer, got {value!r}")
        return str(value)
    if kind is Cell.DATE:
        if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
            raise TypeError(f"expected a date, got {value!r}")
        return value.isoformat()
    if kind is Cell.TIME:
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {value!r}")
        return iso_utc(value)
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return _text_cell(value)


class _CsvLine:
    """One CSV line at a time (RFC 4180: CRLF, quotes only where needed)."""

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\r\n")

    def __call__(self, cells: Sequence[str]) -> str:
        self._writer.writerow(cells)
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text


def _csv_cells(columns: Sequence[tuple[str, Cell]], record: Mapping[str, Value]) -> list[str]:
    """`_csv_cell` of each column; its common cases inlined (a day has a million cells)."""
    currency = record.get("currency")
    if not isinstance(currency, str):
        raise TypeError("every row names its currency")
    cells: list[str] = []
    append = cells.append
    for name, kind in columns:
        value = record[name]
        if value is None:
            append("")
        elif type(value) is int and kind is Cell.INT:
            append(str(value))
        elif type(value) is int and kind is Cell.MONEY:
            append(_money_text(value, currency))
        elif type(value) is str and kind is Cell.TEXT:
            append("'" + value if value.startswith(_FORMULA_START) else value)
        else:
            append(_csv_cell(kind, value, currency))
    return cells


def _csv_row(
    columns: Sequence[tuple[str, Cell]], record: Mapping[str, Value], line: _CsvLine
) -> str:
    return line(_csv_cells(columns, record))


def render_accounts_csv(day: dt.date, accounts: Iterable[AccountUsage]) -> str:
    line = _CsvLine()
    out = [line([name for name, _ in ACCOUNT_COLUMNS])]
    out += [
        _csv_row(ACCOUNT_COLUMNS, account_record(day, a), line)
        for a in sorted(accounts, key=lambda a: a.account_id)
    ]
    return "".join(out)


def call_csv_header(columns: Columns = CALL_COLUMNS) -> str:
    return _CsvLine()([name for name, _ in columns])


def call_csv_line(day: dt.date, call: CallUsage, line: _CsvLine | None = None) -> str:
    return _csv_row(CALL_COLUMNS, call_record(day, call), line or _CsvLine())


def call_csv_lines(
    day: dt.date, calls: Iterable[CallUsage], columns: Columns = CALL_COLUMNS
) -> str:
    """The lines of many calls at once: the same text as `call_csv_line` of each, joined.
    `columns`: CALL_COLUMNS, or CALL_COLUMNS_BEFORE_DIRECTION to rebuild a day published then."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(_csv_cells(columns, call_record(day, call)) for call in calls)
    return buffer.getvalue()


def _json_value(kind: Cell, value: Value) -> Any:
    if isinstance(value, float):
        raise TypeError("a float has no place in a usage report")
    if value is None:
        return None
    if kind is Cell.DATE and isinstance(value, dt.date):
        return value.isoformat()
    if kind is Cell.TIME and isinstance(value, dt.datetime):
        return iso_utc(value)
    return value


def _json_record(columns: Sequence[tuple[str, Cell]], record: Mapping[str, Value]) -> Any:
    currency = record["currency"]
    if not isinstance(currency, str):
        raise TypeError("every row names its currency")
    out: dict[str, Any] = {}
    for name, kind in columns:
        value = record[name]
        if kind is Cell.MONEY:
            out[name] = _csv_cell(kind, value, currency)
            out[f"{name}_minor"] = value
        else:
            out[name] = _json_value(kind, value)
    return out


def _no_floats(value: Any, where: str = "report") -> None:
    if isinstance(value, float):
        raise TypeError(f"a float at {where}: money and time are integers in meterd")
    if isinstance(value, dict):
        for key, item in value.items():
            _no_floats(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_floats(item, f"{where}[{index}]")


RECONCILIATION_RULES = {
    "bank_minutes": "bank_opening_minutes + bank_included_minutes + bank_granted_minutes + "
    "bank_card_minutes - bank_used_minutes + bank_waived_minutes = bank_closing_minutes",
    "deposit": "deposit_opening + deposit_paid_in - deposit_used + deposit_waived = "
    "deposit_closing",
    "receivable": "receivable_opening + receivable_charged - receivable_waived = "
    "receivable_closing",
    "calls": "for every account, the calls file's columns add up to the account's "
    + ", ".join(TIED_COLUMNS),
}


def _totals(accounts: Sequence[AccountUsage], day: dt.date) -> list[Any]:
    """Per currency: the sum of every count, minutes and money column."""
    summed = [
        name
        for name, kind in ACCOUNT_COLUMNS
        if kind in (Cell.INT, Cell.MONEY) and name != "business_day"
    ]
    by_currency: dict[str, dict[str, int]] = {}
    for account in accounts:
        record = account_record(day, account)
        total = by_currency.setdefault(
            account.currency, {"accounts": 0, **dict.fromkeys(summed, 0)}
        )
        total["accounts"] += 1
        for name in summed:
            value = record[name]
            assert isinstance(value, int)
            total[name] += value
    out = []
    for currency in sorted(by_currency):
        total = by_currency[currency]
        entry: dict[str, Any] = {"currency": currency, "accounts": total["accounts"]}
        for name, kind in ACCOUNT_COLUMNS:
            if name not in total:
                continue
            if kind is Cell.MONEY:
                entry[name] = format_minor(total[name], currency)
                entry[f"{name}_minor"] = total[name]
            else:
                entry[name] = total[name]
        out.append(entry)
    return out


def render_accounts_json(
    day: dt.date,
    timezone: str,
    accounts: Iterable[AccountUsage],
    *,
    calls_rows: int,
    calls_sha256: str,
) -> str:
    ordered = sorted(accounts, key=lambda a: a.account_id)
    start, end = day_bounds(day, timezone)
    document: dict[str, Any] = {
        "business_day": day.isoformat(),
        "timezone": timezone,
        "from": iso_utc(start),
        "to": iso_utc(end),
        "length_seconds": (end - start) // dt.timedelta(seconds=1),
        "reconciled": True,
        "reconciliation": RECONCILIATION_RULES,
        "accounts": [_json_record(ACCOUNT_COLUMNS, account_record(day, a)) for a in ordered],
        "totals": _totals(ordered, day),
        "calls_csv": {"rows": calls_rows, "sha256": calls_sha256},
    }
    _no_floats(document)
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"
