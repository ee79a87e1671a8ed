"""The nightly usage's pure core: business days across clock changes, the columns every kind of
entry lands in, the reconciliation and its message, and the CSV/JSON text (exact decimals, no
floats, the same bytes every time)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import defaultdict
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterd.core import ledger
from meterd.core.usage import (
    CALL_COLUMNS,
    CALL_COLUMNS_BEFORE_DIRECTION,
    AccountUsage,
    BookBalance,
    CallsDoNotTie,
    CallUsage,
    InvalidBusinessDay,
    Movements,
    PostingGroup,
    ReconciliationError,
    RowStatus,
    TimeFacts,
    business_day_of,
    call_csv_header,
    call_csv_line,
    call_csv_lines,
    day_bounds,
    last_closed_day,
    parse_business_day,
    reconcile,
    render_accounts_csv,
    render_accounts_json,
    tie_calls,
)

UTC = dt.UTC
NY = "America/New_York"


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


# --- business days -------------------------------------------------------------------------


def test_the_day_daylight_saving_starts_in_new_york_has_23_hours():
    start, end = day_bounds(dt.date(2026, 3, 8), NY)
    assert (start, end) == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4))  # EST midnight to EDT
    assert end - start == dt.timedelta(hours=23)


def test_the_day_daylight_saving_ends_in_new_york_has_25_hours():
    start, end = day_bounds(dt.date(2026, 11, 1), NY)
    assert (start, end) == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5))  # EDT midnight to EST
    assert end - start == dt.timedelta(hours=25)
    # both 01:30s of that night belong to it
    assert business_day_of(utc(2026, 11, 1, 5, 30), NY) == dt.date(2026, 11, 1)  # 01:30 EDT
    assert business_day_of(utc(2026, 11, 1, 6, 30), NY) == dt.date(2026, 11, 1)  # 01:30 EST


def test_a_skipped_midnight_starts_the_day_when_the_gap_ends():
    # Chile springs forward at midnight: 2026-09-06 00:00 -04 is 01:00 -03
    start, end = day_bounds(dt.date(2026, 9, 6), "America/Santiago")
    assert start == utc(2026, 9, 6, 4) and end - start == dt.timedelta(hours=23)
    assert day_bounds(dt.date(2026, 9, 5), "America/Santiago")[1] == start


def test_a_repeated_midnight_starts_the_day_at_the_first():
    # Cuba falls back from 01:00 to 00:00: midnight happens twice on 2026-11-01
    start, end = day_bounds(dt.date(2026, 11, 1), "America/Havana")
    assert start == utc(2026, 11, 1, 4) and end - start == dt.timedelta(hours=25)


ZONES = [
    "UTC",
    NY,
    "Europe/Berlin",
    "Australia/Lord_Howe",  # a half-hour change
    "America/Santiago",  # springs forward at midnight
    "America/Havana",  # falls back onto midnight
    "Asia/Kolkata",
    "Pacific/Auckland",
]


@settings(max_examples=300, deadline=None)
@given(st.dates(dt.date(2000, 1, 1), dt.date(2037, 12, 30)), st.sampled_from(ZONES))
def test_business_days_tile_time_and_every_instant_of_a_day_is_on_that_date(day, zone):
    start, end = day_bounds(day, zone)
    assert day_bounds(day + dt.timedelta(days=1), zone)[0] == end  # no gap, no overlap
    assert dt.timedelta(hours=22) <= end - start <= dt.timedelta(hours=26)
    tick = dt.timedelta(microseconds=1)
    assert business_day_of(start, zone) == day == business_day_of(end - tick, zone)
    assert business_day_of(start - tick, zone) == day - dt.timedelta(days=1)
    assert start.tzinfo is UTC and end.tzinfo is UTC


def test_a_day_is_closed_only_a_margin_after_it_ends():
    assert last_closed_day(utc(2026, 11, 21, 0, 1, 59), "UTC", 120) == dt.date(2026, 11, 19)
    assert last_closed_day(utc(2026, 11, 21, 0, 2), "UTC", 120) == dt.date(2026, 11, 20)
    # New York's 25-hour day closes at 05:00 UTC (plus the margin), not 04:00
    assert last_closed_day(utc(2026, 11, 2, 4, 30), NY, 120) == dt.date(2026, 10, 31)
    assert last_closed_day(utc(2026, 11, 2, 5, 2), NY, 120) == dt.date(2026, 11, 1)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("2026-02-30", "2026-02-30 is not a date"),
        ("2026-13-01", "2026-13-01 is not a date"),
        ("2026-2-3", "expected a date written YYYY-MM-DD"),
        ("20261120", "expected a date written YYYY-MM-DD"),
        ("yesterday", "expected a date written YYYY-MM-DD"),
    ],
)
def test_an_impossible_or_badly_written_date_is_refused(text, says):
    with pytest.raises(InvalidBusinessDay, match=says):
        parse_business_day(text)


def test_a_real_date_is_read():
    assert parse_business_day("2024-02-29") == dt.date(2024, 2, 29)


# --- columns ---------------------------------------------------------------------------------

A = "acme"
USD = "USD"


def groups_of(transactions, originals=None) -> list[PostingGroup]:
    """Postings summed the way the service's SQL sums them."""
    kinds = {t.key: t.kind for t in (originals or [])} | {t.key: t.kind for t in transactions}
    sums: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in transactions:
        waiver = t.kind == "reversal" and t.memo == "waiver"
        reversed_kind = kinds.get(t.reverses_key) if t.reverses_key else None
        for p in t.postings:
            entry = sums[(t.kind, reversed_kind, waiver, p.book, p.unit)]
            entry[0] += p.amount
            entry[1] += max(p.amount, 0)
            entry[2] += 1
    return [
        PostingGroup(kind, reversed_kind, waiver, book, unit, amount, positive, count)
        for (kind, reversed_kind, waiver, book, unit), (amount, positive, count) in sums.items()
    ]


def movements_of(transactions, originals=None) -> Movements:
    m = Movements()
    for group in groups_of(transactions, originals):
        m.add(group, A)
    return m


def minute(n, source, amount=100, call="CA1"):
    return ledger.minute(
        call, "alice", n, account_id=A, currency=USD, source=source, amount_minor=amount
    )


def test_each_kind_of_entry_lands_in_its_column():
    bank = minute(1, "bank")
    paid = minute(2, "deposit")
    owed = minute(3, "receivable")
    incident = ledger.incident(
        "CA1", 1, call_sid="CA1", account_id=A, currency=USD, payer="deposit", amount_minor=5000
    )
    by_card = ledger.incident(
        "CA2", 1, call_sid="CA2", account_id=A, currency=USD, payer="card", amount_minor=5000
    )
    block = ledger.card_block(
        "k1", account_id=A, call_sid="CA1", minutes=30, currency=USD, amount_minor=3000
    )
    refund = ledger.card_refund(
        "k1:refund", account_id=A, call_sid="CA1", minutes=10, currency=USD, amount_minor=1000
    )
    card = minute(4, "card")
    day = [
        ledger.deposit(A, USD, 10_000, "wire-1"),
        ledger.grant_minutes(A, 7, "goodwill"),
        ledger.included_minutes(A, 45),
        bank,
        paid,
        owed,
        minute(5, "covered"),
        incident,
        by_card,
        block,
        refund,
        card,
        ledger.reversal_of(paid, memo="settlement: not supported by the final timeline"),
        ledger.reversal_of(bank, memo="waiver"),
        ledger.reversal_of(owed, memo="waiver"),
        ledger.reversal_of(incident, memo="waiver"),
        ledger.reversal_of(card, memo="waiver"),
    ]
    m = movements_of(day)
    assert (m.deposit_paid_in, m.bank_granted_minutes, m.bank_included_minutes) == (10_000, 7, 45)
    # minutes 1..5 taken, minute 2 given back by settlement: 4; waivers do not unmake usage
    assert m.agent_minutes == 4
    assert (m.bank_used_minutes, m.bank_waived_minutes) == (1, 1)
    assert (m.deposit_used, m.deposit_waived) == (100 - 100 + 5000, 5000)
    assert (m.receivable_charged, m.receivable_waived) == (100, 100)
    assert (m.incidents, m.incidents_waived) == (2, 1)  # one by deposit, one by card
    assert m.bank_card_minutes == 30 - 10
    assert (m.card_charges, m.card_refunds, m.card_waived) == (3000 + 5000 + 100, 1000, 100)
    assert m.unexplained == {}


# One account's possible transactions, to check that the columns explain every posting.
_SOURCES = ["bank", "deposit", "debt", "receivable", "card", "covered"]


@st.composite
def ledgers(draw):
    made: list[ledger.Transaction] = []
    reversed_keys: set[str] = set()
    for n in range(draw(st.integers(1, 40))):
        choice = draw(st.integers(0, 7))
        amount = draw(st.integers(1, 10_000))
        if choice == 0:
            t = ledger.deposit(A, USD, amount, f"r{n}")
        elif choice == 1:
            t = ledger.grant_minutes(A, draw(st.integers(1, 90)), f"g{n}")
        elif choice == 2:
            t = minute(n, draw(st.sampled_from(_SOURCES)), amount, call=f"CA{n % 3}")
        elif choice == 3:
            t = ledger.incident(
                f"CA{n}",
                1,
                call_sid=f"CA{n}",
                account_id=A,
                currency=USD,
                payer=draw(st.sampled_from(["deposit", "receivable", "card"])),
                amount_minor=amount,
            )
        elif choice == 4:
            t = ledger.card_block(
                f"b{n}",
                account_id=A,
                call_sid=None,
                minutes=draw(st.integers(1, 60)),
                currency=USD,
                amount_minor=amount,
            )
        elif choice == 5:
            t = ledger.card_refund(
                f"b{n}:refund",
                account_id=A,
                call_sid=None,
                minutes=draw(st.integers(1, 60)),
                currency=USD,
                amount_minor=amount,
            )
        else:
            candidates = [x for x in made if x.kind != "reversal" and x.key not in reversed_keys]
            if not candidates:
                continue
            original = draw(st.sampled_from(candidates))
            reversed_keys.add(original.key)
            t = ledger.reversal_of(original, memo=draw(st.sampled_from(["waiver", "settlement"])))
        made.append(t)
    cut = draw(st.integers(0, len(made)))
    return made[:cut], made[cut:]


def _balances(transactions) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for t in transactions:
        for p in t.postings:
            out[p.book] += p.amount
    return out


@settings(max_examples=300, deadline=None)
@given(ledgers())
def test_opening_plus_the_columns_is_the_closing_balance_for_any_known_entries(split):
    before, day = split
    opening, closing = _balances(before), _balances(before + day)
    usage = AccountUsage(A, USD, movements=movements_of(day, before))
    for kind, book in [
        ("bank", ledger.bank_book(A)),
        ("deposit", ledger.deposit_book(A)),
        ("receivable", ledger.receivable_book(A)),
    ]:
        usage.balances[kind] = BookBalance(opening[book], closing[book])
    reconcile(usage)  # raises if any posting is in no column, or in two
    assert usage.movements.unexplained == {}
    used = sum(p.amount for t in day for p in t.postings if p.book == ledger.MINUTES_USED)
    waived = sum(
        p.amount
        for t in day
        if t.kind == "reversal" and t.memo == "waiver"
        for p in t.postings
        if p.book == ledger.MINUTES_USED
    )
    assert usage.movements.agent_minutes == used - waived


def test_a_reconciliation_failure_names_the_account_the_book_and_the_difference():
    usage = AccountUsage(A, USD)
    usage.movements.deposit_used = 400
    usage.balances["deposit"] = BookBalance(opening=1000, closing=500)
    with pytest.raises(ReconciliationError) as caught:
        reconcile(usage)
    assert str(caught.value) == (
        "account acme does not reconcile on customer:acme:deposit: opening 10.00 USD + "
        "movements -4.00 USD = 6.00 USD, but the closing balance is 5.00 USD "
        "(off by -1.00 USD)"
    )
    assert caught.value.off_by == -100


def test_a_reconciliation_failure_in_minutes_speaks_in_agent_minutes():
    usage = AccountUsage(A, USD, balances={"bank": BookBalance(10, 9)})
    with pytest.raises(ReconciliationError, match="off by -1 agent-minutes"):
        reconcile(usage)


def test_an_entry_of_an_unknown_kind_on_a_customer_book_is_refused_and_named():
    chargeback = ledger.transfer(
        "cb1",
        "card_chargeback",
        unit=USD,
        amount=500,
        from_book=ledger.deposit_book(A),
        to_book="system:USD:chargebacks",
        account_id=A,
    )
    usage = AccountUsage(A, USD, movements=movements_of([chargeback]))
    usage.balances["deposit"] = BookBalance(opening=2000, closing=1500)
    with pytest.raises(ReconciliationError) as caught:
        reconcile(usage)
    assert "off by -5.00 USD" in str(caught.value)
    assert "entries the report cannot classify: card_chargeback on the deposit" in str(caught.value)


def test_a_moving_customer_book_the_report_has_no_column_for_is_refused():
    usage = AccountUsage(A, USD, balances={"card_hold": BookBalance(0, 300)})
    with pytest.raises(ReconciliationError, match=r"customer:acme:card_hold"):
        reconcile(usage)


def test_calls_that_do_not_add_up_to_their_account_are_refused():
    usage = AccountUsage(A, USD, movements=Movements(agent_minutes=5))
    with pytest.raises(CallsDoNotTie, match="the calls add up to 4 agent_minutes"):
        tie_calls(usage, Movements(agent_minutes=4))


# --- files -----------------------------------------------------------------------------------

DAY = dt.date(2026, 11, 20)


def _account(account_id="acme", currency=USD, deposit=(1234, 1234)) -> AccountUsage:
    usage = AccountUsage(account_id, currency)
    usage.balances["deposit"] = BookBalance(*deposit)
    return usage


def test_the_accounts_csv_has_a_header_crlf_lines_and_exact_money_text():
    accounts = [
        _account("zeta", "JPY", (1500, 1500)),
        _account("acme", USD, (1234, 1239)),
        _account("kw", "KWD", (1, 1)),
        _account("xof", "XOF", (1500, 1500)),  # ISO 4217: no decimals (a hand table said 2)
        _account("clf", "CLF", (12345, 12345)),  # ISO 4217: four decimals
    ]
    accounts[1].movements.deposit_paid_in = 5
    text = render_accounts_csv(DAY, accounts)
    assert text.count("\r\n") == 6 and text.endswith("\r\n") and "\n\n" not in text
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["account_id"] for r in rows] == ["acme", "clf", "kw", "xof", "zeta"]  # by account
    acme, clf, kw, xof, zeta = rows
    assert (xof["deposit_opening"], clf["deposit_opening"]) == ("1500", "1.2345")
    assert (acme["deposit_opening"], acme["deposit_paid_in"], acme["deposit_closing"]) == (
        "12.34",
        "0.05",
        "12.39",
    )
    assert (acme["currency"], acme["business_day"], acme["reconciled"]) == (
        "USD",
        "2026-11-20",
        "yes",
    )
    assert kw["deposit_opening"] == "0.001" and zeta["deposit_opening"] == "1500"
    assert acme["receivable_closing"] == "0.00" and acme["bank_closing_minutes"] == "0"


def test_the_json_gives_money_as_decimal_text_and_minor_units_and_never_a_float():
    usage = _account(deposit=(1000, 995))
    usage.movements.deposit_used = 5
    text = render_accounts_json(DAY, NY, [usage], calls_rows=0, calls_sha256="0" * 64)
    document = json.loads(text, parse_float=lambda _: pytest.fail("a float in the JSON"))
    (account,) = document["accounts"]
    assert (account["deposit_used"], account["deposit_used_minor"]) == ("0.05", 5)
    assert (document["from"], document["to"]) == (
        "2026-11-20T05:00:00+00:00",
        "2026-11-21T05:00:00+00:00",
    )
    assert document["reconciled"] is True
    assert document["totals"][0]["deposit_closing"] == "9.95"


def test_a_float_never_reaches_a_file():
    usage = _account()
    usage.movements.deposit_used = 0.5  # type: ignore[assignment]
    with pytest.raises(TypeError, match="float"):
        render_accounts_csv(DAY, [usage])
    with pytest.raises(TypeError, match="float"):
        render_accounts_json(DAY, "UTC", [usage], calls_rows=0, calls_sha256="")


def _call(sid="CA1", waiver_reason=None, direction="inbound") -> CallUsage:
    return CallUsage(
        call_sid=sid,
        account_id=A,
        plan="per_minute",
        currency=USD,
        status=RowStatus.SETTLED,
        started_at=utc(2026, 11, 20, 15, 0, 0),
        ended_at=dt.datetime(2026, 11, 20, 10, 5, 30, 123456, tzinfo=ZoneInfo(NY)),
        settled_at=utc(2026, 11, 20, 15, 10),
        waiver_reason=waiver_reason,
        time=TimeFacts(("alice", "bob"), 30, 210, 60, 240, 5),
        movements=Movements(agent_minutes=5, deposit_used=500),
        direction=direction,
    )


def test_a_call_row_has_utc_times_to_the_second_and_its_time_facts():
    header = next(csv.reader([call_csv_header()]))
    row = dict(zip(header, next(csv.reader([call_csv_line(DAY, _call())])), strict=True))
    assert row["started_at"] == "2026-11-20T15:00:00+00:00"
    assert row["ended_at"] == "2026-11-20T15:05:30+00:00"
    assert (row["agents"], row["hold_seconds"], row["call_agent_minutes"]) == (
        "alice bob",
        "30",
        "5",
    )
    assert (row["deposit_used"], row["waiver_reason"]) == ("5.00", "")


def test_a_text_cell_a_spreadsheet_would_run_as_a_formula_is_defused():
    line = call_csv_line(DAY, _call(waiver_reason='=HYPERLINK("http://x")'))
    row = next(csv.reader([line]))
    assert row[-2] == '\'=HYPERLINK("http://x")' and row[-1] == "inbound"


# The calls file's columns as published before `direction` (issue 17): a contract with finance,
# so a column is only ever added at the end, never renamed or moved.
PUBLISHED_BEFORE_DIRECTION = (
    "business_day,call_sid,account_id,plan,currency,status,started_at,ended_at,settled_at,"
    "agents,hold_seconds,active_seconds,research_seconds,billable_seconds,call_agent_minutes,"
    "agent_minutes,bank_used_minutes,deposit_used,receivable_charged,card_charges,incidents,"
    "bank_waived_minutes,deposit_waived,receivable_waived,card_waived,card_refunds,"
    "incidents_waived,waiver_reason"
)


def test_direction_is_the_calls_file_s_last_column_after_the_published_ones():
    assert call_csv_header() == PUBLISHED_BEFORE_DIRECTION + ",direction\r\n"
    assert call_csv_header(CALL_COLUMNS_BEFORE_DIRECTION) == PUBLISHED_BEFORE_DIRECTION + "\r\n"
    assert CALL_COLUMNS[:-1] == CALL_COLUMNS_BEFORE_DIRECTION
    calls = [_call("CA1"), _call("CA2", direction="outbound")]
    rows = list(csv.reader(io.StringIO(call_csv_lines(DAY, calls), newline="")))
    assert [(row[1], row[-1]) for row in rows] == [("CA1", "inbound"), ("CA2", "outbound")]
    # the earlier layout, to rebuild a day published in it: the same rows without direction
    before = list(
        csv.reader(
            io.StringIO(call_csv_lines(DAY, calls, CALL_COLUMNS_BEFORE_DIRECTION), newline="")
        )
    )
    assert before == [row[:-1] for row in rows]


def test_rendering_twice_gives_the_same_bytes():
    accounts = [_account("b"), _account("a")]
    assert render_accounts_csv(DAY, accounts) == render_accounts_csv(DAY, accounts[::-1])
    first = render_accounts_json(DAY, NY, accounts, calls_rows=3, calls_sha256="ab")
    assert first == render_accounts_json(DAY, NY, accounts[::-1], calls_rows=3, calls_sha256="ab")
