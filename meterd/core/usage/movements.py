"""How the day's ledger entries land in the usage report's columns (what a row counts).

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
  that it does (`reconciliation.tie_calls`, over `TIED_COLUMNS`).
- Money columns are amounts of the account's currency; minutes columns are agent-minutes.
  Consumption is positive (`bank_used_minutes`, `deposit_used`); `receivable_*` is what the
  customer owes (positive, although the ledger keeps that book negative).
- `card_charges` is the money taken by card (blocks bought, minutes paid by an authorisation),
  `card_refunds` the money given back to the card, `card_waived` card-paid minutes waived.
- A movement the report cannot classify (a transaction kind it does not know, on a customer
  book) is in no column but in `Movements.unexplained`, so the reconciliation fails by exactly
  that amount and names the kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum

from meterd.core.ledger import (
    INCIDENT_KINDS,
    MINUTES,
    MINUTES_USED,
    TransactionKind,
    bank_book,
    deposit_book,
    receivable_book,
)

__all__ = [
    "REVERSAL",
    "TIED_COLUMNS",
    "WAIVER_MEMO",
    "Movements",
    "PostingGroup",
    "Role",
    "role_of",
]

# The memo of a waiver's reversals (meterd.services.funding.reverse_charges): what tells a
# waiver from a settlement correction, which reverses with another memo.
WAIVER_MEMO = "waiver"
REVERSAL = TransactionKind.REVERSAL

# How each kind of transaction moves a customer's books. A kind not named here that touches a
# customer book makes the reconciliation fail, naming it.
_BANK_IN: dict[str, str] = {
    TransactionKind.INCLUDED_MINUTES: "bank_included_minutes",
    TransactionKind.MINUTES_GRANTED: "bank_granted_minutes",
    TransactionKind.CARD_BLOCK: "bank_card_minutes",
    # a refund takes the block's unused minutes back out
    TransactionKind.CARD_REFUND: "bank_card_minutes",
}
_MINUTE_KINDS = frozenset(
    {
        TransactionKind.MINUTE_BANK,
        TransactionKind.MINUTE_DEPOSIT,
        TransactionKind.MINUTE_DEBT,
        TransactionKind.MINUTE_RECEIVABLE,
        TransactionKind.MINUTE_CARD,
        TransactionKind.MINUTE_COVERED,
    }
)
_DEPOSIT_CHARGES = frozenset(
    {
        TransactionKind.MINUTE_DEPOSIT,
        TransactionKind.MINUTE_DEBT,
        TransactionKind.INCIDENT_DEPOSIT,
    }
)
_RECEIVABLE_CHARGES = frozenset(
    {TransactionKind.MINUTE_RECEIVABLE, TransactionKind.INCIDENT_RECEIVABLE}
)
_INCIDENT_KINDS = INCIDENT_KINDS
_CARD_CHARGES = frozenset(
    {TransactionKind.CARD_BLOCK, TransactionKind.MINUTE_CARD, TransactionKind.INCIDENT_CARD}
)
_CARD_REFUNDS = frozenset({TransactionKind.CARD_REFUND})
_WAIVABLE = _MINUTE_KINDS | _INCIDENT_KINDS  # what a waiver reverses (its memo says so)


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
        elif role is Role.DEPOSIT and kind == TransactionKind.DEPOSIT:
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
