"""The pure rule that trades banked minutes between two calls of one account at settlement
(`meterd/core/bank_shares.py`): the bank pays the minutes that fell due first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meterd.core.bank_shares import TakenMinute, bank_trades

SETTLING = "CA-settling"


def _minute(key: str, call_sid: str, due_seconds: int, *, banked: bool) -> TakenMinute:
    return TakenMinute(key, call_sid, due_seconds, banked)


def test_the_minute_due_first_takes_the_banked_minute():
    late_banked = _minute("x:1", SETTLING, 325, banked=True)
    early_owed = _minute("y:1", "CA-other", 296, banked=False)
    assert bank_trades([late_banked, early_owed], SETTLING) == [(late_banked, early_owed)]


def test_the_issue_11_figures_three_of_call_0_s_banked_minutes_go_to_call_1():
    """Twilio 30 s behind: call 0's banked minutes due at 323, 325, 326 (stamp seconds) and
    call 1's three first minutes due at 296: three trades, the latest banked first."""
    call_0 = [_minute(f"c0:{d}", SETTLING, d, banked=True) for d in (-7, 53, 113, 265, 266)]
    call_0 += [_minute(f"c0:{d}", SETTLING, d, banked=True) for d in (323, 325, 326)]
    call_1 = [_minute(f"c1:{a}", "CA-1", 296, banked=False) for a in ("a0", "a1", "a2")]
    trades = bank_trades(call_0 + call_1, SETTLING)
    assert sorted(paid.due_seconds for paid, _ in trades) == [323, 325, 326]
    assert sorted(owed.key for _, owed in trades) == ["c1:a0", "c1:a1", "c1:a2"]


def test_ties_and_minutes_of_one_call_do_not_trade():
    same_moment = [
        _minute("x:1", SETTLING, 300, banked=True),
        _minute("y:1", "CA-o", 300, banked=False),
    ]
    one_call = [
        _minute("x:1", SETTLING, 300, banked=True),
        _minute("x:2", SETTLING, 200, banked=False),
    ]
    assert bank_trades(same_moment, SETTLING) == []
    assert bank_trades(one_call, SETTLING) == []  # the call's own funding order settles that


def test_two_other_calls_never_trade_with_each_other():
    minutes = [_minute("y:1", "CA-y", 400, banked=True), _minute("z:1", "CA-z", 100, banked=False)]
    assert bank_trades(minutes, SETTLING) == []


_minutes = st.lists(
    st.builds(
        TakenMinute,
        key=st.uuids().map(str),
        call_sid=st.sampled_from([SETTLING, "CA-1", "CA-2"]),
        due_seconds=st.integers(0, 600),
        banked=st.booleans(),
    ),
    max_size=30,
    unique_by=lambda m: m.key,
)


@given(_minutes)
def test_trades_keep_the_bank_s_count_and_only_ever_move_it_earlier(minutes):
    trades = bank_trades(minutes, SETTLING)
    keys = [m.key for trade in trades for m in trade]
    assert len(keys) == len(set(keys)), "a minute trades at most once"
    for paid, owed in trades:
        assert paid.banked and not owed.banked
        assert owed.due_seconds < paid.due_seconds
        assert SETTLING in (paid.call_sid, owed.call_sid) and paid.call_sid != owed.call_sid
    # the order is right afterwards wherever a trade was allowed: no unpaid minute of one side
    # falls due before a banked minute of the other that is still banked
    traded = set(keys)
    banked_after = [m for m in minutes if m.banked and m.key not in traded]
    banked_after += [owed for _, owed in trades]
    unpaid_after = [m for m in minutes if not m.banked and m.key not in traded]
    unpaid_after += [paid for paid, _ in trades]
    assert len(banked_after) == sum(m.banked for m in minutes)
    for owed in unpaid_after:
        for paid in banked_after:
            allowed = paid.call_sid != owed.call_sid and SETTLING in (paid.call_sid, owed.call_sid)
            if allowed and owed.key not in traded and paid.key not in traded:
                assert paid.due_seconds <= owed.due_seconds
