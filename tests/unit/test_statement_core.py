"""The statement's pure core (`meterd/core/usage/statement.py`): days that each reconcile and
chain add up to a period that reconciles; a break in the chain is refused, never shown."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterd.core.usage.statement import (
    BALANCES,
    SUMMED,
    StatementDoesNotReconcile,
    build_statement,
    zero_row,
)

DAY0 = dt.date(2026, 11, 1)


def _day(opening: dict[str, int], moves: dict[str, int]) -> dict[str, int | str]:
    """One day's row: `moves` on the movement columns, the closing worked out."""
    row: dict[str, int | str] = zero_row("acme", "USD") | moves
    for balance, (opens, closes, movements) in BALANCES.items():
        row[opens] = opening[balance]
        row[closes] = opening[balance] + sum(sign * int(row[n]) for n, sign in movements)
    return row


_moves = st.fixed_dictionaries(
    {name: st.integers(0, 10_000) for _, _, movements in BALANCES.values() for name, _ in movements}
)


@given(st.lists(_moves, min_size=1, max_size=40))
def test_days_that_chain_make_a_period_that_reconciles(days_moves):
    balances = {balance: 0 for balance in BALANCES}
    rows = []
    for offset, moves in enumerate(days_moves):
        row = _day(balances, moves)
        balances = {b: int(row[c]) for b, (_, c, _) in BALANCES.items()}
        rows.append((DAY0 + dt.timedelta(days=offset), row))
    statement = build_statement("acme", "USD", rows, [])
    assert statement.closing == balances
    assert len(statement.days) == len(rows) == len(statement.day_closings)
    for name in SUMMED:
        assert statement.totals[name] == sum(int(row[name]) for _, row in rows)


def test_a_day_that_does_not_open_where_the_last_closed_is_refused():
    first = _day({b: 0 for b in BALANCES}, {"deposit_paid_in": 500})
    second = _day({"bank_minutes": 0, "deposit_minor": 400, "receivable_minor": 0}, {})
    with pytest.raises(StatementDoesNotReconcile, match="deposit_minor of acme opens 2026-11-02"):
        build_statement("acme", "USD", [(DAY0, first), (DAY0 + dt.timedelta(days=1), second)], [])


def test_a_day_whose_movements_do_not_explain_its_closing_is_refused():
    row = _day({b: 0 for b in BALANCES}, {"deposit_paid_in": 500})
    row["deposit_closing"] = 499
    says = "opening 0 \\+ movements 500 != closing 499"
    with pytest.raises(StatementDoesNotReconcile, match=says):
        build_statement("acme", "USD", [(DAY0, row)], [])


def _settled(sid: str, direction: str | None) -> dict[str, str]:
    """A settled call's row of a calls file; `None`: a file published before `direction`."""
    row = {"business_day": DAY0.isoformat(), "call_sid": sid, "status": "settled"}
    return row if direction is None else row | {"direction": direction}


def test_the_calls_by_direction_add_up_to_the_calls_and_move_no_money():
    row = _day({b: 0 for b in BALANCES}, {"deposit_paid_in": 500, "deposit_used": 300})
    row["calls"] = 2
    calls = [_settled("CA1", "inbound"), _settled("CA2", "outbound")]
    calls.append(_settled("CA0", "inbound") | {"status": "adjusted"})  # settled another day
    statement = build_statement("acme", "USD", [(DAY0, row)], calls)
    assert statement.directions == {"inbound_calls": 1, "outbound_calls": 1}
    assert statement.day_directions == [{"inbound_calls": 1, "outbound_calls": 1}]
    assert [(c["call_sid"], c["direction"]) for c in statement.calls] == [
        ("CA1", "inbound"),
        ("CA2", "outbound"),
        ("CA0", "inbound"),
    ]
    assert statement.closing["deposit_minor"] == 200 and statement.totals["calls"] == 2


def test_a_calls_file_published_before_direction_counts_its_calls_inbound():
    row = _day({b: 0 for b in BALANCES}, {})
    row["calls"] = 2
    statement = build_statement(
        "acme", "USD", [(DAY0, row)], [_settled("CA1", None), _settled("CA2", None)]
    )
    assert statement.directions == {"inbound_calls": 2, "outbound_calls": 0}
    assert [c["direction"] for c in statement.calls] == ["inbound", "inbound"]


def test_calls_by_direction_that_do_not_add_up_to_the_calls_are_refused():
    row = _day({b: 0 for b in BALANCES}, {})
    row["calls"] = 3
    says = "calls of acme: 1 inbound \\+ 1 outbound settled in the calls files, but the "
    with pytest.raises(StatementDoesNotReconcile, match=says + "accounts files count 3"):
        build_statement(
            "acme", "USD", [(DAY0, row)], [_settled("CA1", "inbound"), _settled("CA2", "outbound")]
        )
