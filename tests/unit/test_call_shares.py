"""The pure rule that trades the bank's and the deposit's minutes between two calls of one
account at settlement (`meterd/core/call_shares.py`): they pay the minutes that fell due first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meterd.core.call_shares import TRADES, Payer, TakenMinute, payer_trades

SETTLING = "CA-settling"
BANK, DEPOSIT, OWED, DEBT = Payer.BANK, Payer.DEPOSIT, Payer.RECEIVABLE, Payer.DEBT
BANK_TRADES, DEPOSIT_TRADES = TRADES


def _minute(key: str, call_sid: str, due_seconds: int, payer: Payer) -> TakenMinute:
    return TakenMinute(key, call_sid, due_seconds, payer)


def _bank_trades(minutes: list[TakenMinute]) -> list[tuple[TakenMinute, TakenMinute]]:
    return payer_trades(minutes, SETTLING, *BANK_TRADES)


def test_the_minute_due_first_takes_the_banked_minute():
    late_banked = _minute("x:1", SETTLING, 325, BANK)
    early_owed = _minute("y:1", "CA-other", 296, OWED)
    assert _bank_trades([late_banked, early_owed]) == [(late_banked, early_owed)]


def test_the_issue_11_figures_three_of_call_0_s_banked_minutes_go_to_call_1():
    """Twilio 30 s behind: call 0's banked minutes due at 323, 325, 326 (stamp seconds) and
    call 1's three first minutes due at 296: three trades, the latest banked first."""
    call_0 = [_minute(f"c0:{d}", SETTLING, d, BANK) for d in (-7, 53, 113, 265, 266)]
    call_0 += [_minute(f"c0:{d}", SETTLING, d, BANK) for d in (323, 325, 326)]
    call_1 = [_minute(f"c1:{a}", "CA-1", 296, OWED) for a in ("a0", "a1", "a2")]
    trades = _bank_trades(call_0 + call_1)
    assert sorted(paid.due_seconds for paid, _ in trades) == [323, 325, 326]
    assert sorted(owed.key for _, owed in trades) == ["c1:a0", "c1:a1", "c1:a2"]


def test_the_deposit_s_minute_goes_to_the_call_whose_minute_fell_due_first():
    """Issue 11, Twilio 27 s behind: call 1's minute paid from the deposit fell due after an
    owed minute of call 0; the deposit trades, the bank's trades leave it alone."""
    call_0 = [_minute("c0:a0:3", SETTLING, 250, OWED), _minute("c0:a1:3", SETTLING, 260, OWED)]
    call_1 = [_minute("c1:a1:1", "CA-1", 240, BANK), _minute("c1:a1:2", "CA-1", 300, DEPOSIT)]
    assert _bank_trades(call_0 + call_1) == []
    trades = payer_trades(call_0 + call_1, SETTLING, *DEPOSIT_TRADES)
    assert [(paid.key, unpaid.key) for paid, unpaid in trades] == [("c1:a1:2", "c0:a0:3")]


def test_the_bank_trades_with_debt_but_not_deposit_minutes_and_the_deposit_not_with_debt():
    """A late banked minute may be one of a block bought once the deposit ran out (issue 11,
    found at 4f1052f): the bank does not trade with the deposit."""
    late_banked = [_minute(f"x:{d}", SETTLING, d, BANK) for d in (400, 500)]
    earlier = [_minute("y:1", "CA-o", 100, DEPOSIT), _minute("y:2", "CA-o", 200, DEBT)]
    assert [unpaid.key for _, unpaid in _bank_trades(late_banked + earlier)] == ["y:2"]
    late_deposit = [_minute("x:1", SETTLING, 400, DEPOSIT)]
    assert payer_trades(late_deposit + earlier[1:], SETTLING, *DEPOSIT_TRADES) == []


def test_money_paid_in_between_the_two_minutes_stops_a_deposit_trade():
    late_deposit = _minute("x:1", SETTLING, 400, DEPOSIT)
    early_owed = _minute("y:1", "CA-o", 100, OWED)
    trades = payer_trades([late_deposit, early_owed], SETTLING, *DEPOSIT_TRADES, [250])
    assert trades == []
    before_both = payer_trades([late_deposit, early_owed], SETTLING, *DEPOSIT_TRADES, [50, 100])
    assert before_both == [(late_deposit, early_owed)]


def test_ties_and_minutes_of_one_call_do_not_trade():
    same_moment = [_minute("x:1", SETTLING, 300, BANK), _minute("y:1", "CA-o", 300, OWED)]
    one_call = [_minute("x:1", SETTLING, 300, BANK), _minute("x:2", SETTLING, 200, OWED)]
    assert _bank_trades(same_moment) == []
    assert _bank_trades(one_call) == []  # the call's own funding order settles that


def test_two_other_calls_never_trade_with_each_other():
    minutes = [_minute("y:1", "CA-y", 400, BANK), _minute("z:1", "CA-z", 100, OWED)]
    assert _bank_trades(minutes) == []


_minutes = st.lists(
    st.builds(
        TakenMinute,
        key=st.uuids().map(str),
        call_sid=st.sampled_from([SETTLING, "CA-1", "CA-2"]),
        due_seconds=st.integers(0, 600),
        payer=st.sampled_from(Payer),
    ),
    max_size=30,
    unique_by=lambda m: m.key,
)


@given(_minutes, st.sampled_from(TRADES))
def test_trades_keep_each_payer_s_count_and_only_ever_move_it_earlier(minutes, trade):
    better, worse = trade
    trades = payer_trades(minutes, SETTLING, better, worse)
    keys = [m.key for pair in trades for m in pair]
    assert len(keys) == len(set(keys)), "a minute trades at most once"
    for paid, unpaid in trades:
        assert paid.payer == better and unpaid.payer in worse
        assert unpaid.due_seconds < paid.due_seconds
        assert SETTLING in (paid.call_sid, unpaid.call_sid) and paid.call_sid != unpaid.call_sid
    # the order is right afterwards wherever a trade was allowed: no unpaid minute of one side
    # falls due before a paid minute of the other that is still paid
    traded = set(keys)
    paid_after = [m for m in minutes if m.payer == better and m.key not in traded]
    paid_after += [unpaid for _, unpaid in trades]
    unpaid_after = [m for m in minutes if m.payer in worse and m.key not in traded]
    assert len(paid_after) == sum(m.payer == better for m in minutes)
    for unpaid in unpaid_after:
        for paid in paid_after:
            allowed = paid.call_sid != unpaid.call_sid and SETTLING in (
                paid.call_sid,
                unpaid.call_sid,
            )
            if allowed and paid.key not in traded:
                assert paid.due_seconds <= unpaid.due_seconds
