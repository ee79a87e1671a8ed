"""The ledger's vocabulary: books, postings, balanced transactions and their idempotency keys.

Double entry in two units: agent-minutes (`MINUTES`) and money (an ISO 4217 code, amounts in
minor units). A transaction's postings sum to zero per unit, by construction: `Transaction`
refuses to exist otherwise. A balance is the sum of its book's postings; a customer's bank or
deposit is positive when meterd owes the customer (minutes banked, money deposited).

Books (ledger accounts):
- `customer:<account_id>:bank`      the customer's banked agent-minutes
- `customer:<account_id>:deposit`   the customer's prepaid deposit, in the account's currency
- `system:minutes:issued`           where granted, included and purchased minutes come from
- `system:minutes:used`             where minutes taken for calls go
- `system:<CUR>:deposits_received`  where deposited money comes from (cash received)
- `system:<CUR>:usage_revenue`      where money taken for call minutes goes
- `system:<CUR>:incident_revenue`   where per-incident charges go
- `customer:<account_id>:receivable` what the customer owes beyond their funds (negative), in
                                     the account's currency, for finance to invoice
- `system:minutes:unbanked`         where the agent-minute of a minute not paid from the bank
                                     comes from (money-funded or covered by the plan), so every
                                     metered minute moves one agent-minute into minutes:used

A correction never edits: it is a new transaction, e.g. `reversal_of(t)`.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum

from meterd.core.money import MONEY_MINOR_MAX, check_currency
from meterd.core.rating import Source

MINUTES = "agent_minute"  # the unit of the minute bank
IDEMPOTENCY_KEY_CHARS_MAX = 255  # Stripe's limit too, so a key can be passed through unchanged
MINUTES_MAX = 10**9


class LedgerError(Exception):
    """A transaction that cannot be posted as built."""


class UnbalancedTransaction(LedgerError):
    """Postings that do not sum to zero per unit: a programming error, never bad input."""


class TransactionKind(StrEnum):
    """What a transaction records: the `kind` of every transaction meterd posts. A transaction
    read back from the database keeps the kind it was stored with, a plain string when it is not
    one of these (the usage report then names it rather than guessing)."""

    DEPOSIT = "deposit"  # money paid into the prepaid deposit
    MINUTES_GRANTED = "minutes_granted"  # minutes put into the bank by an operator
    INCLUDED_MINUTES = "included_minutes"  # the minutes a first main product brings
    MINUTE_BANK = "minute_bank"  # a call's minute, from the bank
    MINUTE_DEPOSIT = "minute_deposit"  # ... paid from the deposit
    MINUTE_DEBT = "minute_debt"  # ... from a deposit allowed into debt
    MINUTE_RECEIVABLE = "minute_receivable"  # ... owed, for finance to invoice
    MINUTE_CARD = "minute_card"  # ... paid by the card's authorisation
    MINUTE_COVERED = "minute_covered"  # ... covered by the plan: usage at zero price
    INCIDENT_DEPOSIT = "incident_deposit"  # a per-incident charge, from the deposit
    INCIDENT_CARD = "incident_card"  # ... by card
    INCIDENT_RECEIVABLE = "incident_receivable"  # ... owed
    CARD_BLOCK = "card_block"  # a block of minutes bought by card
    CARD_REFUND = "card_refund"  # part or all of a card block given back
    REVERSAL = "reversal"  # undoes another transaction exactly


class BookKind(StrEnum):
    BANK = "bank"
    DEPOSIT = "deposit"
    RECEIVABLE = "receivable"
    SYSTEM = "system"


def bank_book(account_id: str) -> str:
    return f"customer:{account_id}:bank"


def deposit_book(account_id: str) -> str:
    return f"customer:{account_id}:deposit"


def receivable_book(account_id: str) -> str:
    return f"customer:{account_id}:receivable"


MINUTES_ISSUED = "system:minutes:issued"
MINUTES_USED = "system:minutes:used"
MINUTES_UNBANKED = "system:minutes:unbanked"


def deposits_received_book(currency: str) -> str:
    return f"system:{check_currency(currency)}:deposits_received"


def usage_revenue_book(currency: str) -> str:
    return f"system:{check_currency(currency)}:usage_revenue"


def incident_revenue_book(currency: str) -> str:
    return f"system:{check_currency(currency)}:incident_revenue"


def system_book_unit(book: str) -> str:
    """The unit of a system book, read from its name."""
    parts = book.split(":")
    if len(parts) != 3 or parts[0] != "system":
        raise LedgerError(f"{book!r} is not a system book")
    return MINUTES if parts[1] == "minutes" else check_currency(parts[1])


@dataclass(frozen=True, order=True)
class Posting:
    book: str
    unit: str
    amount: int  # signed: + raises the book's balance, - lowers it

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise LedgerError(f"posting amount must be an integer, got {self.amount!r}")
        if self.amount == 0:
            raise LedgerError(f"zero posting to {self.book}")
        limit = MINUTES_MAX if self.unit == MINUTES else MONEY_MINOR_MAX
        if abs(self.amount) > limit:
            raise LedgerError(f"posting of {self.amount} {self.unit} is beyond {limit}")


@dataclass(frozen=True)
class Transaction:
    """A balanced set of postings under one idempotency key.

    `key` is derived from what caused the transaction (e.g. `account:A1:deposit:<reference>`), so
    the same cause can only ever be posted once. `fingerprint` covers everything that matters
    about the content: the same key with a different fingerprint is refused.
    """

    key: str
    kind: str  # a TransactionKind; as read back from the database, the stored string
    postings: tuple[Posting, ...]
    account_id: str | None = None
    call_sid: str | None = None
    memo: str = ""
    reverses_key: str | None = None

    def __post_init__(self) -> None:
        if not self.key or len(self.key) > IDEMPOTENCY_KEY_CHARS_MAX:
            raise LedgerError(f"idempotency key must be 1 to {IDEMPOTENCY_KEY_CHARS_MAX} chars")
        if not self.postings:
            raise LedgerError(f"transaction {self.key} has no postings")
        totals: dict[str, int] = defaultdict(int)
        units_by_book: dict[str, str] = {}
        for posting in self.postings:
            totals[posting.unit] += posting.amount
            if units_by_book.setdefault(posting.book, posting.unit) != posting.unit:
                raise UnbalancedTransaction(f"{self.key}: book {posting.book} in two units")
        unbalanced = {unit: total for unit, total in totals.items() if total != 0}
        if unbalanced:
            raise UnbalancedTransaction(f"{self.key}: postings do not balance: {unbalanced}")

    @property
    def fingerprint(self) -> str:
        content = {
            "kind": self.kind,
            "account_id": self.account_id,
            "call_sid": self.call_sid,
            "reverses_key": self.reverses_key,
            "postings": sorted([p.book, p.unit, p.amount] for p in self.postings),
        }
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def transfer(
    key: str,
    kind: str,
    *,
    unit: str,
    amount: int,
    from_book: str,
    to_book: str,
    account_id: str | None = None,
    call_sid: str | None = None,
    memo: str = "",
) -> Transaction:
    """Move `amount` of `unit` from one book to another: the common two-legged transaction."""
    if amount <= 0:
        raise LedgerError(f"transfer amount must be positive, got {amount}")
    return Transaction(
        key=key,
        kind=kind,
        account_id=account_id,
        call_sid=call_sid,
        memo=memo,
        postings=(Posting(from_book, unit, -amount), Posting(to_book, unit, amount)),
    )


def reversal_key(original_key: str) -> str:
    """One key per reversed transaction, whatever the cause (settlement, waiver): a transaction
    is reversed at most once, and the database holds `reverses_key` unique too."""
    return f"reversal:{original_key}"


def reversal_of(original: Transaction, key: str | None = None, memo: str = "") -> Transaction:
    """The compensating transaction that undoes `original` exactly."""
    return Transaction(
        key=key or reversal_key(original.key),
        kind=TransactionKind.REVERSAL,
        account_id=original.account_id,
        call_sid=original.call_sid,
        memo=memo or f"reverses {original.key}",
        reverses_key=original.key,
        postings=tuple(Posting(p.book, p.unit, -p.amount) for p in original.postings),
    )


def deposit(account_id: str, currency: str, amount_minor: int, reference: str) -> Transaction:
    """Money paid into an account's prepaid deposit; the reference names the payment."""
    return transfer(
        f"account:{account_id}:deposit:{reference}",
        TransactionKind.DEPOSIT,
        unit=currency,
        amount=amount_minor,
        from_book=deposits_received_book(currency),
        to_book=deposit_book(account_id),
        account_id=account_id,
        memo=reference,
    )


def grant_minutes(account_id: str, minutes: int, reference: str) -> Transaction:
    """Minutes put into an account's bank by an operator (a purchase, a goodwill grant)."""
    return transfer(
        f"account:{account_id}:minutes:{reference}",
        TransactionKind.MINUTES_GRANTED,
        unit=MINUTES,
        amount=minutes,
        from_book=MINUTES_ISSUED,
        to_book=bank_book(account_id),
        account_id=account_id,
        memo=reference,
    )


def included_minutes(account_id: str, minutes: int) -> Transaction:
    """The minutes a first main product brings; the key makes it once per account, ever."""
    return transfer(
        f"account:{account_id}:included-minutes",
        TransactionKind.INCLUDED_MINUTES,
        unit=MINUTES,
        amount=minutes,
        from_book=MINUTES_ISSUED,
        to_book=bank_book(account_id),
        account_id=account_id,
        memo="included minutes of the first main product",
    )


def minute_key(call_sid: str, agent_id: str, n: int) -> str:
    return f"call:{call_sid}:agent:{agent_id}:minute:{n}"


REBOOKED_SUFFIX = ":from-bank"  # settlement moved a money-paid minute onto the bank
REBOOKED_FROM_DEPOSIT_SUFFIX = ":from-deposit"  # settlement moved an owed minute onto the deposit
REBOOKED_FROM_CARD_SUFFIX = ":from-card"  # ... or onto the call's card authorisation
REPRICED_SUFFIX = ":repriced"  # settlement priced a minute taken early at its final due moment
# ... or, its banked minute given to another call's minute due earlier, owed or on debt
_REBOOKED_SUFFIXES = {"bank": REBOOKED_SUFFIX, "card": REBOOKED_FROM_CARD_SUFFIX}  # else deposit
_REBOOKED_SUFFIXES |= {"receivable": ":owed", "debt": ":on-debt"}  # (services/call_shares.py)
SETTLEMENT_SUFFIXES = (*_REBOOKED_SUFFIXES.values(), REBOOKED_FROM_DEPOSIT_SUFFIX, REPRICED_SUFFIX)


def live_minute_key(key: str) -> str:
    """The key a minute was first posted under (live, or at settlement if it was missing),
    from that key or one settlement rebooked or repriced it under. Suffixes never stack: a
    rebooking is keyed from the minute's first key, whichever key it replaces."""
    for suffix in SETTLEMENT_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key


def parse_minute_key(key: str) -> tuple[str, int]:
    """(agent_id, n) of a minute's key (agent ids may themselves hold colons)."""
    head, _, number = live_minute_key(key).rpartition(":minute:")
    _, _, agent_id = head.partition(":agent:")
    return agent_id, int(number)


# Kinds of transaction that charge the customer (and that a waiver reverses). A covered minute
# records usage at zero price and is not a charge.
MONEY_MINUTE_KINDS = frozenset(
    {
        TransactionKind.MINUTE_DEPOSIT,
        TransactionKind.MINUTE_DEBT,
        TransactionKind.MINUTE_RECEIVABLE,
        TransactionKind.MINUTE_CARD,
    }
)
# Card payments: a block of minutes bought by card (`card_block`); in authorise mode a minute
# paid by the card's authorisation (`minute_card`).
CARD_KINDS = frozenset({TransactionKind.CARD_BLOCK, TransactionKind.MINUTE_CARD})
INCIDENT_KINDS = frozenset(
    {
        TransactionKind.INCIDENT_DEPOSIT,
        TransactionKind.INCIDENT_CARD,
        TransactionKind.INCIDENT_RECEIVABLE,
    }
)
CHARGE_KINDS = frozenset({TransactionKind.MINUTE_BANK, *MONEY_MINUTE_KINDS, *INCIDENT_KINDS})
# A minute's kind by its funding source, an incident's by its payer.
_MINUTE_KIND_BY_SOURCE = {
    "bank": TransactionKind.MINUTE_BANK,
    "deposit": TransactionKind.MINUTE_DEPOSIT,
    "debt": TransactionKind.MINUTE_DEBT,
    "receivable": TransactionKind.MINUTE_RECEIVABLE,
    "card": TransactionKind.MINUTE_CARD,
    "covered": TransactionKind.MINUTE_COVERED,
}


def minute_source(kind: str) -> Source:
    """The funding source a minute transaction of this kind was paid from."""
    for source, minute_kind in _MINUTE_KIND_BY_SOURCE.items():
        if minute_kind == kind:
            return Source(source)
    raise LedgerError(f"{kind!r} is not a minute's kind")


_INCIDENT_KIND_BY_PAYER = {
    "deposit": TransactionKind.INCIDENT_DEPOSIT,
    "card": TransactionKind.INCIDENT_CARD,
    "receivable": TransactionKind.INCIDENT_RECEIVABLE,
}


def minute(
    call_sid: str,
    agent_id: str,
    n: int,
    *,
    account_id: str,
    currency: str,
    source: str,
    amount_minor: int,
    rebooked: bool = False,
    repriced: bool = False,
) -> Transaction:
    """Agent `agent_id`'s minute `n` on a call. Every minute moves one agent-minute into
    `minutes:used`: from the bank if banked, else from `minutes:unbanked`; a priced minute also
    moves its money from the deposit (or, owed, from the receivable) to usage revenue.
    `rebooked`: settlement moving a minute onto the bank or (an owed one) onto the deposit or
    the call's card authorisation, under its own key; `repriced`: settlement pricing a minute
    taken before its final due moment at that moment's rate, under its own key."""
    if rebooked and repriced:
        raise LedgerError("a minute is rebooked or repriced, not both at once")
    suffix = ""
    if rebooked:
        suffix = _REBOOKED_SUFFIXES.get(source, REBOOKED_FROM_DEPOSIT_SUFFIX)
    elif repriced:
        suffix = REPRICED_SUFFIX
    key = minute_key(call_sid, agent_id, n) + suffix
    legs: list[Posting] = [Posting(MINUTES_USED, MINUTES, 1)]
    if source == "bank":
        legs.append(Posting(bank_book(account_id), MINUTES, -1))
    else:
        legs.append(Posting(MINUTES_UNBANKED, MINUTES, -1))
    if source in ("deposit", "debt", "receivable", "card"):
        payer = {
            "receivable": receivable_book(account_id),
            "card": card_receipts_book(currency),
        }.get(source, deposit_book(account_id))
        legs += [
            Posting(payer, currency, -amount_minor),
            Posting(usage_revenue_book(currency), currency, amount_minor),
        ]
    elif source not in ("bank", "covered"):
        raise LedgerError(f"unknown funding source {source!r}")
    return Transaction(
        key=key,
        kind=_MINUTE_KIND_BY_SOURCE[source],
        postings=tuple(legs),
        account_id=account_id,
        call_sid=call_sid,
        memo=f"agent {agent_id} minute {n}",
    )


def incident_key(group_sid: str, k: int) -> str:
    return f"incident:{group_sid}:{k}"


def parse_incident_key(key: str) -> tuple[str, int]:
    """(group_sid, k) of an incident's key."""
    _, group_sid, k = key.split(":")
    return group_sid, int(k)


def incident(
    group_sid: str,
    k: int,
    *,
    call_sid: str,
    account_id: str,
    currency: str,
    payer: str,
    amount_minor: int,
) -> Transaction:
    """The `k`-th incident of an incident group (the first call and its linked follow-ups),
    paid from the deposit, by card, or owed as a receivable (`payer`)."""
    books = {
        "deposit": deposit_book(account_id),
        "card": card_receipts_book(currency),
        "receivable": receivable_book(account_id),
    }
    return transfer(
        incident_key(group_sid, k),
        _INCIDENT_KIND_BY_PAYER[payer],
        unit=currency,
        amount=amount_minor,
        from_book=books[payer],
        to_book=incident_revenue_book(currency),
        account_id=account_id,
        call_sid=call_sid,
        memo=f"incident {k} of {group_sid}",
    )


def card_receipts_book(currency: str) -> str:
    return f"system:{check_currency(currency)}:card_receipts"


def block_revenue_book(currency: str) -> str:
    return f"system:{check_currency(currency)}:block_revenue"


def card_block(
    operation_key: str,
    *,
    account_id: str,
    call_sid: str | None,
    minutes: int,
    currency: str,
    amount_minor: int,
) -> Transaction:
    """A block of minutes bought by card: the card's money is received, the minutes are banked."""
    legs = [
        Posting(MINUTES_ISSUED, MINUTES, -minutes),
        Posting(bank_book(account_id), MINUTES, minutes),
    ]
    if amount_minor:
        legs += [
            Posting(card_receipts_book(currency), currency, -amount_minor),
            Posting(block_revenue_book(currency), currency, amount_minor),
        ]
    return Transaction(
        key=f"payment:{operation_key}",
        kind=TransactionKind.CARD_BLOCK,
        postings=tuple(legs),
        account_id=account_id,
        call_sid=call_sid,
        memo=f"{minutes} minutes bought by card",
    )


def card_refund(
    operation_key: str,
    *,
    account_id: str,
    call_sid: str | None,
    minutes: int,
    currency: str,
    amount_minor: int,
) -> Transaction:
    """Part or all of a card block given back: its unused minutes leave the bank, the money
    goes back to the card."""
    legs = []
    if minutes:
        legs += [
            Posting(bank_book(account_id), MINUTES, -minutes),
            Posting(MINUTES_ISSUED, MINUTES, minutes),
        ]
    if amount_minor:
        legs += [
            Posting(block_revenue_book(currency), currency, -amount_minor),
            Posting(card_receipts_book(currency), currency, amount_minor),
        ]
    return Transaction(
        key=f"payment:{operation_key}",
        kind=TransactionKind.CARD_REFUND,
        postings=tuple(legs),
        account_id=account_id,
        call_sid=call_sid,
        memo=f"card refund of {amount_minor} for {minutes} unused minutes",
    )
