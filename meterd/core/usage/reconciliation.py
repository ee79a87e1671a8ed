"""The usage report's rows, and the reconciliation that must pass before any is published.

- For every account and every one of its books: opening + movements = closing, where opening
  and closing are the book's balance at the day's start and end and movements are the report's
  own columns (bank: included + granted + card - used + waived; deposit: paid in - used +
  waived; receivable, in the ledger's sign: - charged + waived). A movement the report cannot
  classify (a transaction kind it does not know, on a customer book) is in no column, so the
  reconciliation fails by exactly that amount and says which kind: the report is refused rather
  than published with an unexplained number (`reconcile`).
- The calls file adds up to the accounts file, column by column, for every account
  (`tie_calls`, over `movements.TIED_COLUMNS`).
- A settled call's time facts are its timeline's, exactly as settlement built it, summed over
  its agents (`time_facts`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from meterd.core.ledger import MINUTES, bank_book, deposit_book, receivable_book
from meterd.core.money import format_minor
from meterd.core.timeline import Timeline, agent_minutes
from meterd.core.usage.movements import TIED_COLUMNS, Movements, Role

__all__ = [
    "AccountUsage",
    "BookBalance",
    "CallUsage",
    "CallsDoNotTie",
    "ReconciliationError",
    "RowStatus",
    "TimeFacts",
    "UsageDoesNotReconcile",
    "reconcile",
    "tie_calls",
    "time_facts",
]


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


def time_facts(timeline: Timeline, increment_seconds: int) -> TimeFacts:
    """A settled call's time facts: its timeline summed over its agents, each agent's billable
    seconds rounded up to agent-minutes by the rule's increment."""
    active = research = billable = minutes = 0
    for agent in timeline.agents.values():
        seconds = agent.billable_seconds
        active += agent.active_seconds
        research += agent.research_seconds
        billable += seconds
        minutes += agent_minutes(seconds, increment_seconds)
    return TimeFacts(
        agents=tuple(sorted(timeline.agents)),
        hold_seconds=timeline.hold_seconds,
        active_seconds=active,
        research_seconds=research,
        billable_seconds=billable,
        agent_minutes=minutes,
    )


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
    direction: str  # "inbound", or "outbound" for a callback the desk placed (0009)


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
