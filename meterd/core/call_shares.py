"""Which call's minutes the bank and the deposit pay, when two calls of one account run at once.

Pure, no I/O. The funding order is the account's: each agent-minute, in the order the minutes
fell due across all the account's calls, is paid from the bank while it holds minutes, then
from the deposit while it holds the minute's price, then owed (or on debt). Live, meterd takes
a minute when it learns of it; a Twilio event that arrives late (Twilio's clock behind ours, a
retried callback) can make another call's minute fall due before a minute the bank or the
deposit already paid. At settlement the two trade payers: the minute due first takes the
better payer, the later one the other's payer, each at the rate when it fell due. The
account's minutes used stay the same; only who paid which minute changes.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass


class Payer(enum.StrEnum):
    """Who paid a minute, named as the ledger's funding sources (`ledger.Source`)."""

    BANK = "bank"
    DEPOSIT = "deposit"
    RECEIVABLE = "receivable"  # owed, for finance to invoice
    DEBT = "debt"  # the deposit allowed into debt


# The trades settlement makes, in this order: the bank's minutes against the owed and the debt
# ones, then the deposit's against the owed (a deposit-paid and a debt minute cost the deposit
# alike). The bank does not trade with the deposit: a banked minute due late is often one of a
# block bought because the deposit ran out, which the earlier minute could not have had.
TRADES: tuple[tuple[Payer, frozenset[Payer]], ...] = (
    (Payer.BANK, frozenset({Payer.RECEIVABLE, Payer.DEBT})),
    (Payer.DEPOSIT, frozenset({Payer.RECEIVABLE})),
)


@dataclass(frozen=True)
class TakenMinute:
    """One minute as settlement sees it: its key, its call, when it fell due by its call's
    timeline (epoch seconds) and who paid it."""

    key: str
    call_sid: str
    due_seconds: int
    payer: Payer


def payer_trades(
    minutes: Sequence[TakenMinute],
    settling_call_sid: str,
    better: Payer,
    worse: Collection[Payer],
    refilled_seconds: Collection[int] = (),
) -> list[tuple[TakenMinute, TakenMinute]]:
    """Pairs (paid, unpaid): `paid` paid by `better`, `unpaid` by one of `worse`, of different
    calls, one of them the settling call's, where `unpaid` fell due strictly before `paid`:
    `better` should have paid it. The earliest unpaid minute is matched with the latest paid one
    of another call, and so on while the order is wrong; each minute trades at most once.
    `refilled_seconds`: moments `better` was paid into (a deposit); a pair with one between
    its due moments does not trade, since `paid` may have been paid with money that came after
    `unpaid` fell due."""
    paid_minutes = sorted(
        (m for m in minutes if m.payer == better),
        key=lambda m: (m.due_seconds, m.key),
        reverse=True,
    )
    unpaid_minutes = sorted(
        (m for m in minutes if m.payer in worse), key=lambda m: (m.due_seconds, m.key)
    )
    trades: list[tuple[TakenMinute, TakenMinute]] = []
    used: set[str] = set()
    for unpaid in unpaid_minutes:
        for paid in paid_minutes:
            if paid.due_seconds <= unpaid.due_seconds:
                break  # the rest of the paid minutes fell due earlier still
            if paid.key in used or paid.call_sid == unpaid.call_sid:
                continue
            if settling_call_sid not in (paid.call_sid, unpaid.call_sid):
                continue
            if any(unpaid.due_seconds < at <= paid.due_seconds for at in refilled_seconds):
                continue
            used.add(paid.key)
            trades.append((paid, unpaid))
            break
    for paid, unpaid in trades:  # the invariant: each trade moves `better` to an earlier minute
        assert unpaid.due_seconds < paid.due_seconds and unpaid.call_sid != paid.call_sid
        assert paid.payer == better and unpaid.payer in worse
    return trades
