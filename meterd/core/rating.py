"""Rating: from billable time to agent-minutes and incidents, and how each minute is funded.

Pure functions, no I/O. Minute `n` of an agent is due the moment its billable time passes
`(n - 1) * increment_seconds`: the first minute as soon as the agent becomes billable, so at any
moment the minutes due are `ceil(billable_seconds / increment_seconds)`, and at completion the
same formula gives the call's final count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from meterd.core.money import ceil_div
from meterd.core.timeline import Interval

INCIDENT_SECONDS = 2 * 60 * 60  # an incident covers up to 2 hours of billable communication


def minutes_due(billable_seconds: int, increment_seconds: int) -> int:
    """How many minutes have been taken once `billable_seconds` have passed."""
    return ceil_div(billable_seconds, increment_seconds)


def minutes_due_live(billable_seconds: int, accruing: bool, increment_seconds: int) -> int:
    """Minutes due now. While billable time is running (`accruing`) it passes the next
    threshold this very instant, so the minute that begins there is due: the first as soon as
    the agent becomes billable (also when the interval that began is still 0 s long, e.g. a
    join stamped this second, or stamped ahead of our clock), the n-th at `(n - 1) * increment`.
    Not accruing, this is `minutes_due`; at completion nothing accrues, so the final count is
    `minutes_due` of the final billable time and settlement corrects the difference."""
    if accruing:
        return billable_seconds // increment_seconds + 1
    return minutes_due(billable_seconds, increment_seconds)


def minute_due_at_seconds(
    billable: Sequence[Interval], n: int, increment_seconds: int
) -> int | None:
    """The moment (epoch seconds) minute `n` became due: when cumulative billable time first
    exceeded `(n - 1) * increment_seconds`. None if it has not (yet)."""
    if n < 1:
        raise ValueError(f"minutes are numbered from 1, got {n}")
    threshold = (n - 1) * increment_seconds
    elapsed = 0
    for interval in sorted(billable):
        if elapsed + interval.seconds > threshold:
            return interval.start_seconds + (threshold - elapsed)
        elapsed += interval.seconds
    return None


def next_minute_due_at_seconds(
    *,
    billable_seconds: int,
    accruing: bool,
    minutes_posted: int,
    increment_seconds: int,
    now_seconds: int,
) -> int | None:
    """When minute `minutes_posted + 1` falls due (`minutes_due_live`) if billable time keeps
    running from `now_seconds`: when it reaches `minutes_posted * increment_seconds`. None if
    the agent's billable time is not running (`accruing`, the timeline's state at now, not its
    intervals: one that begins this very second is still empty). Never before now + 1 s."""
    if not accruing:
        return None
    needed_seconds = minutes_posted * increment_seconds - billable_seconds
    return now_seconds + max(needed_seconds, 1)


def block_refund_minor(price_minor: int, block_minutes: int, minutes_returned: int) -> int:
    """The money given back for `minutes_returned` unused minutes of a block bought for
    `price_minor`: pro rata, rounded up (never against the customer); all of it for all."""
    if block_minutes <= 0 or not 0 <= minutes_returned <= block_minutes:
        raise ValueError(f"cannot return {minutes_returned} of a {block_minutes}-minute block")
    return ceil_div(price_minor * minutes_returned, block_minutes)


def incidents_due(union_billable_seconds: int) -> int:
    """Per-incident: one incident per started 2 hours of billable communication."""
    return ceil_div(union_billable_seconds, INCIDENT_SECONDS)


class Source(StrEnum):
    """Where an agent-minute's value comes from."""

    COVERED = "covered"  # service agreement or per-incident: metered at zero price
    BANK = "bank"  # one banked minute
    DEPOSIT = "deposit"  # the rate, from the prepaid deposit
    CARD = "card"  # the rate, from a card authorisation (card_mode = authorize)
    DEBT = "debt"  # the rate, from the deposit below zero (on_exhausted = allow_debt)
    RECEIVABLE = "receivable"  # the rate, owed by the customer (nothing left to take it from)


@dataclass(frozen=True)
class Funding:
    source: Source
    minutes: int = 0  # agent-minutes taken from the bank
    amount_minor: int = 0  # money taken, at the rate in force


def fund_minute(
    *,
    per_minute: bool,
    bank_minutes: int,
    deposit_minor: int,
    rate_minor: int,
    allow_debt: bool,
    card_hold_minor: int = 0,
) -> Funding:
    """The funding of one agent-minute, in the plan's order: bank, then deposit at the rate,
    then the money a card authorisation still holds; past all, debt under allow_debt, else
    a receivable (every minute is still written). A card block, in block mode, lands in the
    bank, so it is the bank that pays."""
    if not per_minute:
        return Funding(Source.COVERED)
    if bank_minutes >= 1:
        return Funding(Source.BANK, minutes=1)
    if rate_minor == 0:
        return Funding(Source.COVERED)
    if deposit_minor >= rate_minor:
        return Funding(Source.DEPOSIT, amount_minor=rate_minor)
    if card_hold_minor >= rate_minor:
        return Funding(Source.CARD, amount_minor=rate_minor)
    if allow_debt:
        return Funding(Source.DEBT, amount_minor=rate_minor)
    return Funding(Source.RECEIVABLE, amount_minor=rate_minor)


def repriced_source(
    source: Source,
    *,
    old_price_minor: int,
    new_price_minor: int,
    deposit_minor: int,
    card_hold_minor: int,
    allow_debt: bool,
) -> Source:
    """Who pays a money-paid minute that settlement re-prices (taken before its final due
    moment, at another rate): the payer it had, if that payer can pay the new price (the
    deposit or the card's authorisation, each with the old price given back first; owed always
    can); a minute on debt is paid by the deposit if, with its old price given back, the
    deposit (`deposit_minor`, below zero under debt) holds the new one (money deposited since
    paid the debt off), else it stays on debt; else, as for any minute nothing can pay, debt
    under allow_debt or owed."""
    if source not in (Source.DEPOSIT, Source.CARD, Source.DEBT, Source.RECEIVABLE):
        raise ValueError(f"only a money-paid minute has a price to change, not {source}")
    if min(old_price_minor, new_price_minor, card_hold_minor) < 0:
        raise ValueError("prices and the money a hold keeps are never negative here")
    if source is Source.DEBT:
        return Source.DEPOSIT if deposit_minor + old_price_minor >= new_price_minor else source
    held = {Source.DEPOSIT: max(deposit_minor, 0), Source.CARD: card_hold_minor}.get(source)
    if held is None or held + old_price_minor >= new_price_minor:
        return source
    return Source.DEBT if allow_debt else Source.RECEIVABLE


def minutes_left(bank_minutes: int, deposit_minor: int, rate_minor: int) -> int:
    """Agent-minutes the bank and deposit can still pay for."""
    from_deposit = deposit_minor // rate_minor if rate_minor > 0 and deposit_minor > 0 else 0
    return max(bank_minutes, 0) + from_deposit


def total_minutes(billable_by_agent: Iterable[int], increment_seconds: int) -> int:
    return sum(minutes_due(seconds, increment_seconds) for seconds in billable_by_agent)
