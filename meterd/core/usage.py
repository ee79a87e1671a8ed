"""The nightly usage report's pure core: business days, rows, the reconciliation, CSV and JSON.

No I/O, no clock: `meterd.services.usage` reads the database and calls these. Decisions taken
where docs/billing.md and issue 6 are silent (an accountant's reading of "usage by day"):

Days
- A business day is `[local midnight, next local midnight)` in `business_timezone`, as UTC
  instants, so it lasts 23 or 25 hours on the days daylight saving starts or ends. A midnight
  that a clock change skips starts the day at the first instant after the gap; a midnight that
  happens twice starts it at the first. `day_bounds(d)[1] == day_bounds(d + 1)[0]` always, so no
  instant belongs to two days or to none.
- A day is *closed* `close_margin_seconds` after its end (the service's margin lets a write
  transaction in flight at midnight commit); only closed days are reported.

What a row counts
- Every ledger entry is counted on the day it was POSTED (`posted_at`), whenever the call it
  belongs to happened: a settlement correction or a waiver made on a later day lands on that
  later day, and a call across midnight shows its minutes on each day they were taken.
- Per account, one row for every account that exists at the day's end, active or not, ordered by
  account id. `agent_minutes` is the net of agent-minutes the day's entries moved into
  `system:minutes:used` for the account (every plan; settlement corrections included, so a
  correction day can show a negative number; waivers excluded: they have their own columns).
  `calls`, `hold_seconds`, `research_seconds` are those of the account's calls *settled* that day
  (durations in seconds, exact, as everywhere in meterd). `waivers` counts calls waived that day;
  the waived amounts are counted when their reversing entries are posted.
- Per call, one row for each day on which the call had entries posted, was settled, or was
  waived, ordered by call sid. `status` says which row it is: `settled` (the call was settled that
  day: its time facts, taken from the timeline exactly as settlement saw it, are on this row),
  `open` (not settled by the day's end: only the entries of the day), `adjusted` (settled on an
  earlier day: entries made after settlement, such as a waiver). So summing a column of the calls
  file over an account gives that account's column in the accounts file, and the report checks
  that it does (`tie_calls`).
- Money columns are amounts of the account's currency; minutes columns are agent-minutes.
  Consumption is positive (`bank_used_minutes`, `deposit_used`); `receivable_*` is what the
  customer owes (positive, although the ledger keeps that book negative).
- `card_charges` is the money taken by card (blocks bought, minutes paid by an authorisation),
  `card_refunds` the money given back to the card, `card_waived` card-paid minutes waived.

The reconciliation
- For every account and every one of its books: opening + movements = closing, where opening
  and closing are the book's balance at the day's start and end and movements are the report's
  own columns (bank: included + granted + card - used + waived; deposit: paid in - used +
  waived; receivable, in the ledger's sign: - charged + waived). A movement the report cannot
  classify (a transaction kind it does not know, on a customer book) is in no column, so the
  reconciliation fails by exactly that amount and says which kind: the report is refused rather
  than published with an unexplained number.

Files
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
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from meterd.core.ledger import MINUTES, MINUTES_USED, bank_book, deposit_book, receivable_book
from meterd.core.money import format_minor

__all__ = [
    "ACCOUNT_COLUMNS",
    "CALL_COLUMNS",
    "AccountUsage",
    "BookBalance",
    "CallUsage",
    "CallsDoNotTie",
    "InvalidBusinessDay",
    "Movements",
    "PostingGroup",
    "ReconciliationError",
    "Role",
    "RowStatus",
    "TimeFacts",
    "UsageDoesNotReconcile",
    "business_day_of",
    "call_csv_header",
    "call_csv_line",
    "call_csv_lines",
    "day_bounds",
    "last_closed_day",
    "parse_business_day",
    "reconcile",
    "render_accounts_csv",
    "render_accounts_json",
    "tie_calls",
]

# The memo of a waiver's reversals (meterd.services.funding.reverse_charges): what tells a
# waiver from a settlement correction, which reverses with another memo.
WAIVER_MEMO = "waiver"
REVERSAL = "reversal"

# How each kind of transaction moves a customer's books. A kind not named here that touches a
# customer book makes the reconciliation fail, naming it.
_BANK_IN = {
    "included_minutes": "bank_included_minutes",
    "minutes_granted": "bank_granted_minutes",
    "card_block": "bank_card_minutes",
    "card_refund": "bank_card_minutes",  # a refund takes the block's unused minutes back out
}
_MINUTE_KINDS = frozenset(
    {
        "minute_bank",
        "minute_deposit",
        "minute_debt",
        "minute_receivable",
        "minute_card",
        "minute_covered",
    }
)
_DEPOSIT_CHARGES = frozenset({"minute_deposit", "minute_debt", "incident_deposit"})
_RECEIVABLE_CHARGES = frozenset({"minute_receivable", "incident_receivable"})
_INCIDENT_KINDS = frozenset({"incident_deposit", "incident_receivable", "incident_card"})
_CARD_CHARGES = frozenset({"card_block", "minute_card", "incident_card"})
_CARD_REFUNDS = frozenset({"card_refund"})
_WAIVABLE = _MINUTE_KINDS | _INCIDENT_KINDS  # what a waiver reverses (its memo says so)


# --- business days -----------------------------------------------------------------------------


class InvalidBusinessDay(ValueError):
    """Text that is not a date written YYYY-MM-DD, or a date that does not exist."""


_DAY_TEXT = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def parse_business_day(text: str) -> dt.date:
    if not _DAY_TEXT.fullmatch(text):
        raise InvalidBusinessDay(f"expected a date written YYYY-MM-DD, got {text[:40]!r}")
    try:
        return dt.date.fromisoformat(text)
    except ValueError as error:
        raise InvalidBusinessDay(f"{text} is not a date: {error}") from None


def _local_midnight(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    # fold=0: a repeated midnight is its first occurrence; a skipped one resolves (by PEP 495's
    # rule, the offset before the gap) to the instant the gap ends.
    return dt.datetime.combine(day, dt.time(0), tzinfo=zone).astimezone(dt.UTC)


def day_bounds(day: dt.date, timezone: str) -> tuple[dt.datetime, dt.datetime]:
    """The business day `day` in `timezone` as `[start, end)` in UTC."""
    zone = ZoneInfo(timezone)
    return _local_midnight(day, zone), _local_midnight(day + dt.timedelta(days=1), zone)


def business_day_of(instant: dt.datetime, timezone: str) -> dt.date:
    """The business day an instant belongs to."""
    if instant.tzinfo is None:
        raise ValueError("a naive datetime has no business day")
    return instant.astimezone(ZoneInfo(timezone)).date()


def last_closed_day(now: dt.datetime, timezone: str, close_margin_seconds: int) -> dt.date:
    """The newest day whose end is at least `close_margin_seconds` before `now`: the day before
    the business day of `now - margin` (that day started at or before `now - margin`)."""
    settled = now - dt.timedelta(seconds=close_margin_seconds)
    return business_day_of(settled, timezone) - dt.timedelta(days=1)


# --- movements -----------------------------------------------------------------------------------


class Role(StrEnum):
    """What a book is to the account a transaction belongs to."""

    BANK = "bank"
    DEPOSIT = "deposit"
    RECEIVABLE = "receivable"
    MINUTES_USED = "minutes_used"
    OTHER = "other"


def role_of(book: str, account_id: str | None) -> Role:
    if book == MINUTES_USED:
        return Role.MINUTES_USED
    if account_id is not None:
        if book == bank_book(account_id):
            return Role.BANK
        if book == deposit_book(account_id):
            return Role.DEPOSIT
        if book == receivable_book(account_id):
            return Role.RECEIVABLE
    return Role.OTHER


def _is_incident_revenue(book: str) -> bool:
    parts = book.split(":")
    return len(parts) == 3 and parts[0] == "system" and parts[2] == "incident_revenue"


@dataclass(frozen=True)
class PostingGroup:
    """The sum of one day's postings to one book by transactions of one kind (for a reversal:
    of one reversed kind, and waiver or not)."""

    kind: str
    reversed_kind: str | None
    waiver_memo: bool
    book: str
    unit: str
    amount: int  # signed sum of the postings
    positive: int  # sum of the positive postings alone: the money a transaction moved
    postings: int  # how many postings


@dataclass
class Movements:
    """What a day's entries did, in the report's columns (see the module docstring)."""

    agent_minutes: int = 0
    bank_included_minutes: int = 0
    bank_granted_minutes: int = 0
    bank_card_minutes: int = 0
    bank_used_minutes: int = 0
    bank_waived_minutes: int = 0
    deposit_paid_in: int = 0
    deposit_used: int = 0
    deposit_waived: int = 0
    receivable_charged: int = 0
    receivable_waived: int = 0
    card_charges: int = 0
    card_refunds: int = 0
    card_waived: int = 0
    incidents: int = 0
    incidents_waived: int = 0
    # (role, kind) -> amount on a customer book that no column explains
    unexplained: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, group: PostingGroup, account_id: str | None) -> None:
        self.add_group(
            group.kind,
            group.reversed_kind,
            group.waiver_memo,
            group.book,
            group.unit,
            group.amount,
            group.positive,
            group.postings,
            account_id,
        )

    def add_group(
        self,
        group_kind: str,
        reversed_kind: str | None,
        waiver_memo: bool,
        book: str,
        unit: str,
        amount: int,
        positive: int,
        postings: int,
        account_id: str | None,
    ) -> None:
        """`add` of a `PostingGroup` given field by field (the report adds one per row it reads,
        and building each group first costs more than adding it)."""
        reversal = group_kind == REVERSAL
        kind = (reversed_kind or "") if reversal else group_kind
        waiver = reversal and waiver_memo and kind in _WAIVABLE
        role = role_of(book, account_id)
        if unit != MINUTES:
            volume = -positive if reversal else positive
            if kind in _CARD_CHARGES:
                if waiver:
                    self.card_waived -= volume
                else:
                    self.card_charges += volume
            elif kind in _CARD_REFUNDS:
                self.card_refunds += volume
        if kind in _INCIDENT_KINDS and _is_incident_revenue(book):
            # one posting to incident revenue per incident, whoever paid it
            if not reversal:
                self.incidents += postings
            elif waiver:
                self.incidents_waived += postings
            else:
                self.incidents -= postings
        if role is Role.MINUTES_USED:
            if not waiver:
                self.agent_minutes += amount
            return
        if role is Role.OTHER:
            return
        if role is Role.BANK and kind in _BANK_IN:
            column = _BANK_IN[kind]
            setattr(self, column, getattr(self, column) + amount)
        elif role is Role.BANK and kind in _MINUTE_KINDS:
            if waiver:
                self.bank_waived_minutes += amount
            else:
                self.bank_used_minutes -= amount
        elif role is Role.DEPOSIT and kind == "deposit":
            self.deposit_paid_in += amount
        elif role is Role.DEPOSIT and kind in _DEPOSIT_CHARGES:
            if waiver:
                self.deposit_waived += amount
            else:
                self.deposit_used -= amount
        elif role is Role.RECEIVABLE and kind in _RECEIVABLE_CHARGES:
            if waiver:
                self.receivable_waived += amount
            else:
                self.receivable_charged -= amount
        else:
            key = (role.value, group_kind if not reversal else f"reversal of {kind or '?'}")
            self.unexplained[key] = self.unexplained.get(key, 0) + amount

    def book_movement(self, role: Role) -> int:
        """The day's net movement of one customer book, in the ledger's sign, from the columns."""
        if role is Role.BANK:
            return (
                self.bank_included_minutes
                + self.bank_granted_minutes
                + self.bank_card_minutes
                - self.bank_used_minutes
                + self.bank_waived_minutes
            )
        if role is Role.DEPOSIT:
            return self.deposit_paid_in - self.deposit_used + self.deposit_waived
        if role is Role.RECEIVABLE:
            return -self.receivable_charged + self.receivable_waived
        raise ValueError(f"{role} is not a customer book")

    def merge(self, other: Movements) -> None:
        mine, theirs = vars(self), vars(other)
        for name in _MOVEMENT_FIELDS:
            mine[name] += theirs[name]
        for key, amount in other.unexplained.items():
            self.unexplained[key] = self.unexplained.get(key, 0) + amount


_MOVEMENT_FIELDS = tuple(f.name for f in fields(Movements) if f.name != "unexplained")

# The columns every entry of which belongs to a call, so the calls file must add up to them.
TIED_COLUMNS = (
    "agent_minutes",
    "bank_used_minutes",
    "bank_waived_minutes",
    "deposit_used",
    "deposit_waived",
    "receivable_charged",
    "receivable_waived",
    "incidents",
    "incidents_waived",
)
_MONEY_COLUMNS = frozenset(
    {
        "deposit_paid_in",
        "deposit_used",
        "deposit_waived",
        "receivable_charged",
        "receivable_waived",
        "card_charges",
        "card_refunds",
        "card_waived",
    }
)


# --- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BookBalance:
    """A book's balance at the start and at the end of the day, in the ledger's sign."""

    opening: int = 0
    closing: int = 0


@dataclass
class AccountUsage:
    account_id: str
    currency: str
    movements: Movements = field(default_factory=Movements)
    # by book kind (bank, deposit, receivable, or any other customer book kind)
    balances: dict[str, BookBalance] = field(default_factory=dict)
    calls: int = 0
    hold_seconds: int = 0
    research_seconds: int = 0
    waivers: int = 0

    def balance(self, kind: str) -> BookBalance:
        return self.balances.get(kind, BookBalance())


@dataclass(frozen=True)
class TimeFacts:
    """A settled call's time, summed over its agents (the rule's agent-minutes per agent)."""

    agents: tuple[str, ...]
    hold_seconds: int
    active_seconds: int
    research_seconds: int
    billable_seconds: int
    agent_minutes: int


class RowStatus(StrEnum):
    SETTLED = "settled"  # settled this day; the call's time facts are on this row
    OPEN = "open"  # not settled by the end of this day
    ADJUSTED = "adjusted"  # settled on an earlier day; entries made after settlement


@dataclass(frozen=True)
class CallUsage:
    call_sid: str
    account_id: str
    plan: str | None
    currency: str
    status: RowStatus
    started_at: dt.datetime | None
    ended_at: dt.datetime | None  # only once settled by the day's end
    settled_at: dt.datetime | None  # idem
    waiver_reason: str | None  # only once waived by the day's end
    time: TimeFacts | None  # only on the settled row
    movements: Movements


# --- the reconciliation --------------------------------------------------------------------------


class UsageDoesNotReconcile(Exception):
    """The report does not add up; it must not be published."""


def _amount(value: int, unit: str) -> str:
    if unit == MINUTES:
        return f"{value} agent-minutes"
    return f"{format_minor(value, unit)} {unit}"


class ReconciliationError(UsageDoesNotReconcile):
    """Opening + movements != closing for one book of one account."""

    def __init__(
        self,
        account_id: str,
        book: str,
        unit: str,
        opening: int,
        movements: int,
        closing: int,
        unexplained: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.account_id = account_id
        self.book = book
        self.unit = unit
        self.opening = opening
        self.movements = movements
        self.closing = closing
        self.off_by = closing - opening - movements
        message = (
            f"account {account_id} does not reconcile on {book}: opening "
            f"{_amount(opening, unit)} + movements {_amount(movements, unit)} = "
            f"{_amount(opening + movements, unit)}, but the closing balance is "
            f"{_amount(closing, unit)} (off by {_amount(self.off_by, unit)})"
        )
        if unexplained:
            kinds = ", ".join(
                f"{kind} on the {role} ({_amount(amount, unit)})"
                for (role, kind), amount in sorted(unexplained.items())
            )
            message += f"; entries the report cannot classify: {kinds}"
        super().__init__(message)


class CallsDoNotTie(UsageDoesNotReconcile):
    """The calls file does not add up to the accounts file for one column of one account."""

    def __init__(self, account_id: str, column: str, accounts_value: int, calls_value: int) -> None:
        self.account_id = account_id
        self.column = column
        super().__init__(
            f"account {account_id}: the calls add up to {calls_value} {column} but the "
            f"account's entries to {accounts_value}"
        )


_BOOK_ROLES = {"bank": Role.BANK, "deposit": Role.DEPOSIT, "receivable": Role.RECEIVABLE}


def reconcile(account: AccountUsage) -> None:
    """Opening + movements = closing for every book of the account, or `ReconciliationError`."""
    a, m = account.account_id, account.movements
    books = {"bank": bank_book(a), "deposit": deposit_book(a), "receivable": receivable_book(a)}
    for kind in sorted(set(_BOOK_ROLES) | set(account.balances)):
        balance = account.balance(kind)
        unit = MINUTES if kind == "bank" else account.currency
        role = _BOOK_ROLES.get(kind)
        movement = m.book_movement(role) if role is not None else 0
        if balance.opening + movement != balance.closing:
            unexplained = {
                key: amount
                for key, amount in m.unexplained.items()
                if role is not None and key[0] == role.value
            }
            raise ReconciliationError(
                a,
                books.get(kind, f"customer:{a}:{kind}"),
                unit,
                balance.opening,
                movement,
                balance.closing,
                unexplained,
            )


def tie_calls(account: AccountUsage, calls_total: Movements) -> None:
    """The account's calls add up to the account's call columns, or `CallsDoNotTie`."""
    for column in TIED_COLUMNS:
        ours = getattr(account.movements, column)
        theirs = getattr(calls_total, column)
        if ours != theirs:
            raise CallsDoNotTie(account.account_id, column, ours, theirs)


# --- rendering -----------------------------------------------------------------------------------


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
)

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


def call_csv_header() -> str:
    return _CsvLine()([name for name, _ in CALL_COLUMNS])


def call_csv_line(day: dt.date, call: CallUsage, line: _CsvLine | None = None) -> str:
    return _csv_row(CALL_COLUMNS, call_record(day, call), line or _CsvLine())


def call_csv_lines(day: dt.date, calls: Iterable[CallUsage]) -> str:
    """The lines of many calls at once: the same text as `call_csv_line` of each, joined."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(_csv_cells(CALL_COLUMNS, call_record(day, call)) for call in calls)
    return buffer.getvalue()


def new_csv_line() -> _CsvLine:
    return _CsvLine()


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
