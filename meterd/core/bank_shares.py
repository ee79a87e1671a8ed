"""Which call's minutes the bank pays, when two calls of one account run at once.

Pure, no I/O. The funding order is the account's: each agent-minute, in the order the minutes
fell due across all the account's calls, is paid from the bank while it holds minutes. Live,
meterd takes a minute when it learns of it; a Twilio event that arrives late (Twilio's clock
behind ours, a retried callback) can make another call's minute fall due before a minute the
bank already paid. At settlement the two trade payers: the minute due first takes the banked
minute, the later one takes the other's payer (owed or debt) at the rate when it fell due.
The account's minutes used stay the same; only who paid which minute changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TakenMinute:
    """One minute as settlement sees it: its key, its call, when it fell due by its call's
    timeline (epoch seconds) and whether the bank paid it (else it is owed or on debt)."""

    key: str
    call_sid: str
    due_seconds: int
    banked: bool


def bank_trades(
    minutes: Sequence[TakenMinute], settling_call_sid: str
) -> list[tuple[TakenMinute, TakenMinute]]:
    """Pairs (banked, unpaid) of minutes of different calls, one of them the settling call's,
    where the unpaid minute fell due strictly before the banked one: the bank should have paid
    it. The earliest unpaid minute is matched with the latest banked one of another call, and
    so on while the order is wrong; each minute trades at most once."""
    banked = sorted(
        (m for m in minutes if m.banked), key=lambda m: (m.due_seconds, m.key), reverse=True
    )
    unpaid = sorted((m for m in minutes if not m.banked), key=lambda m: (m.due_seconds, m.key))
    trades: list[tuple[TakenMinute, TakenMinute]] = []
    used: set[str] = set()
    for owed in unpaid:
        for paid in banked:
            if paid.due_seconds <= owed.due_seconds:
                break  # the rest of the banked minutes fell due earlier still
            if paid.key in used or paid.call_sid == owed.call_sid:
                continue
            if settling_call_sid not in (paid.call_sid, owed.call_sid):
                continue
            used.add(paid.key)
            trades.append((paid, owed))
            break
    for paid, owed in trades:  # the invariant: each trade moves the bank to an earlier minute
        assert owed.due_seconds < paid.due_seconds and owed.call_sid != paid.call_sid
    return trades
