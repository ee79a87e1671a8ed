"""The nightly usage (issue 6), in-process with a controlled clock, on SQLite and PostgreSQL, and
once through the real daemon. Every figure is worked out by hand beside its assertion. Default
rate: 1.00 per agent-minute; incidents 50.00; increment 60 s; settlement 60 s after the end."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest
import structlog
from sqlalchemy import select, text, update

from meterd.config import load_settings
from meterd.core import ledger
from meterd.core.usage import (
    ACCOUNT_COLUMNS,
    CALL_COLUMNS,
    CALL_COLUMNS_BEFORE_DIRECTION,
    Cell,
    last_closed_day,
)
from meterd.scheduler import Scheduler
from meterd.services.accounts import AccountService, AccountSettings
from meterd.services.errors import InvariantBroken
from meterd.services.usage import (
    CLOSE_MARGIN_SECONDS,
    LEASE_SECONDS,
    LedgerBroken,
    UsageFile,
    UsageMismatch,
    UsageService,
    UsageSettings,
)
from meterd.services.usage_build import UsageBuilder
from meterd.store import ledger_store
from meterd.store.database import open_database
from meterd.store.usage_schema import usage_runs
from meterd.web.app import SERVICES
from tests.call_scripts import CallScript
from tests.e2e.daemon import Daemon, run_cli

from .test_call_list import make_outbound
from .twilio_app import ADMIN, AGENTS, ManualClock, admin, agents, build_app, post_twilio

FINANCE = "finance-token-0123456789abcdef"
NY = "America/New_York"
UTC = dt.UTC
D0, D1, D2 = dt.date(2026, 11, 19), dt.date(2026, 11, 20), dt.date(2026, 11, 21)
ACME, GLOBEX, INITECH = "+14155550101", "+14155550102", "+14155550103"
LICENCE = [{"product": "desktop", "kind": "license"}]


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture
def clock():
    return ManualClock(utc(2026, 11, 19, 10, 0))


def make_app(database, state_dir, clock, timezone="UTC"):
    return build_app(
        database,
        state_dir,
        clock,
        METERD_SETTLE_DELAY_SECONDS="60",
        METERD_BUSINESS_TIMEZONE=timezone,
    )


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    return await aiohttp_client(make_app(database, tmp_path, clock))


def usage_of(client) -> UsageService:
    return client.app[SERVICES].usage


async def create_account(client, account_id, plan, number, products=(), **fields):
    body = {
        "account_id": account_id,
        "name": account_id.title(),
        "plan": plan,
        "caller_ids": [number],
        "products": list(products),
        **fields,
    }
    response = await admin(client, "POST", "/admin/accounts", body)
    assert response.status == 201, await response.text()


async def deposit(client, account_id, amount_minor, reference):
    body = {"amount_minor": amount_minor, "reference": reference}
    response = await admin(client, "POST", f"/admin/accounts/{account_id}/deposits", body)
    assert response.status == 201, await response.text()


async def grant(client, account_id, minutes, reference):
    body = {"minutes": minutes, "reference": reference}
    response = await admin(client, "POST", f"/admin/accounts/{account_id}/minutes", body)
    assert response.status == 201, await response.text()


async def place_call(client, clock, n, number, at) -> CallScript:
    clock.now = at
    script = CallScript(n, at, from_number=number)
    twiml = await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    assert "<Conference" in twiml, twiml
    return script


async def deliver(client, params_list):
    for params in params_list:
        path = "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status"
        assert (await post_twilio(client, path, params)).status == 204


async def tick_until(client, clock, until, step=20):
    while clock.now < until:
        clock.now = min(clock.now + dt.timedelta(seconds=step), until)
        await client.app[SERVICES].metering.tick()


async def settle_at(client, clock, script, at):
    clock.now = at
    await client.app[SERVICES].metering.tick()
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    assert view["settled_at"] is not None
    return view


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def account_row(day, account_id, currency="USD", **values) -> dict[str, str]:
    """A full accounts.csv row: zero everywhere but `values`."""
    row = {name: ("0.00" if kind is Cell.MONEY else "0") for name, kind in ACCOUNT_COLUMNS}
    row.update(business_day=day.isoformat(), account_id=account_id, currency=currency)
    row["reconciled"] = "yes"
    row.update({name: str(value) for name, value in values.items()})
    return row


TIME_FACTS = ("agents", "hold_seconds", "active_seconds", "research_seconds")
TIME_FACTS += ("billable_seconds", "call_agent_minutes")


def call_row(day, call_sid, account_id, plan, status, started_at, **values) -> dict[str, str]:
    """A full calls.csv row: zero charges, no time facts, but `values`."""
    row = {name: ("0.00" if kind is Cell.MONEY else "0") for name, kind in CALL_COLUMNS}
    row.update(
        business_day=day.isoformat(),
        call_sid=call_sid,
        account_id=account_id,
        plan=plan,
        currency="USD",
        status=status,
        started_at=started_at,
        ended_at="",
        settled_at="",
        waiver_reason="",
        direction="inbound",
        **dict.fromkeys(TIME_FACTS, ""),
    )
    row.update({name: str(value) for name, value in values.items()})
    return row


def assert_reconciles(accounts: list[dict[str, str]], calls: list[dict[str, str]]) -> None:
    """The report's own claim, re-checked from the published text."""

    def cents(text_: str) -> int:
        return int(text_.replace(".", ""))

    for a in accounts:
        i = {k: int(v) for k, v in a.items() if k.endswith("_minutes") or k == "calls"}
        assert (
            i["bank_opening_minutes"]
            + i["bank_included_minutes"]
            + i["bank_granted_minutes"]
            + i["bank_card_minutes"]
            - i["bank_used_minutes"]
            + i["bank_waived_minutes"]
            == i["bank_closing_minutes"]
        ), a
        assert cents(a["deposit_opening"]) + cents(a["deposit_paid_in"]) - cents(
            a["deposit_used"]
        ) + cents(a["deposit_waived"]) == cents(a["deposit_closing"]), a
        mine = [c for c in calls if c["account_id"] == a["account_id"]]
        for column in ("agent_minutes", "bank_used_minutes", "bank_waived_minutes", "incidents"):
            assert sum(int(c[column]) for c in mine) == int(a[column]), (a, column)
        for column in ("deposit_used", "deposit_waived"):
            assert sum(cents(c[column]) for c in mine) == cents(a[column]), (a, column)
        assert a["calls"] == str(sum(c["status"] == "settled" for c in mine))


# --- 1. a day of every plan, a waiver, a deposit and a late correction -----------------------


async def test_a_day_of_every_plan_a_waiver_a_deposit_and_a_late_correction_in_hand_worked_rows(
    client, clock, tmp_path
):
    # 2026-11-19 (D0): three accounts; acme has 3 banked minutes and 20.00 deposited
    await create_account(client, "acme", "per_minute", ACME)
    await create_account(client, "globex", "per_incident", GLOBEX)
    await create_account(client, "initech", "service_agreement", INITECH, valid_until="2027-06-30")
    await grant(client, "acme", 3, "g1")
    await deposit(client, "acme", 2000, "d1")
    await deposit(client, "globex", 10_000, "d1")

    # call 1, 23:50 on D0: alice talks 120 s, but her leave reaches us only after midnight, so
    # live metering takes 4 minutes on D0 (to 23:53:59; minute 5 would fall due at 23:54:00):
    # minutes 1-3 from the bank, minute 4 for 1.00
    call1 = await place_call(client, clock, 1, ACME, utc(2026, 11, 19, 23, 50))
    call1.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 120).end(120)
    await deliver(client, call1.events[:3])
    await tick_until(client, clock, utc(2026, 11, 19, 23, 53, 59))
    # the late correction, 00:10 on D1: settlement gives minutes 3 (to the bank) and 4 (1.00)
    # back; the call is charged 2 minutes in all
    clock.now = utc(2026, 11, 20, 0, 10)
    await deliver(client, call1.events[3:] + call1.status_events)
    await settle_at(client, clock, call1, utc(2026, 11, 20, 0, 10))

    # D1 09:00: acme pays in 5.00
    clock.now = utc(2026, 11, 20, 9, 0)
    await deposit(client, "acme", 500, "d2")

    # call 2, per minute: alice 150 s (3 minutes), bob 60 s (1): the bank's 1 minute, then
    # 3 x 1.00; waived at 11:00 by alice
    call2 = await place_call(client, clock, 2, ACME, utc(2026, 11, 20, 10, 0))
    call2.join("customer", 0).join("agent:alice", 0).join("agent:bob", 0)
    call2.leave("agent:bob", 60).leave("agent:alice", 150).end(150)
    await deliver(client, call2.events + call2.status_events)
    await settle_at(client, clock, call2, utc(2026, 11, 20, 10, 4))
    clock.now = utc(2026, 11, 20, 11, 0)
    waiver = {"call_sid": call2.call_sid, "agent_id": "alice", "reason": "software_defect"}
    assert (await agents(client, "/agents/waiver", waiver)).status == 200

    # call 3, per incident: 30 minutes, metered at zero price, one incident of 50.00
    call3 = await place_call(client, clock, 3, GLOBEX, utc(2026, 11, 20, 12, 0))
    call3.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 1800).end(1800)
    await deliver(client, call3.events + call3.status_events)
    await settle_at(client, clock, call3, utc(2026, 11, 20, 12, 32))

    # call 4, service agreement: 30 s on hold until alice joins, 120 s active, and 60 s of
    # research after the caller hung up: 180 s billable, 3 minutes at zero price
    call4 = await place_call(client, clock, 4, INITECH, utc(2026, 11, 20, 13, 0))
    call4.join("customer", 0).join("agent:alice", 30).leave("agent:alice", 150).end(150)
    await deliver(client, call4.events + call4.status_events)
    clock.now = utc(2026, 11, 20, 13, 3, 40)
    research = {
        "call_sid": call4.call_sid,
        "agent_id": "alice",
        "start": call4.at(150).isoformat(),
        "end": call4.at(210).isoformat(),
    }
    assert (await agents(client, "/agents/research", research)).status == 200
    view4 = await settle_at(client, clock, call4, utc(2026, 11, 20, 13, 5))

    # the nightly job, 00:30 on D2, builds both days (the first ever run starts at the first
    # posting)
    clock.now = utc(2026, 11, 21, 0, 30)
    assert await usage_of(client).catch_up() == [D0, D1]

    directory = tmp_path / "usage"
    assert sorted(p.name for p in directory.iterdir()) == [
        "2026-11-19.calls.csv",
        "2026-11-19.csv",
        "2026-11-19.json",
        "2026-11-20.calls.csv",
        "2026-11-20.csv",
        "2026-11-20.json",
    ]
    d0_accounts = read_rows(directory / "2026-11-19.csv")
    assert d0_accounts == [
        account_row(
            D0,
            "acme",
            agent_minutes=4,
            bank_granted_minutes=3,
            bank_used_minutes=3,
            deposit_paid_in="20.00",
            deposit_used="1.00",
            deposit_closing="19.00",
        ),
        account_row(D0, "globex", deposit_paid_in="100.00", deposit_closing="100.00"),
        account_row(D0, "initech"),
    ]
    d0_calls = read_rows(directory / "2026-11-19.calls.csv")
    assert d0_calls == [
        call_row(
            D0,
            call1.call_sid,
            "acme",
            "per_minute",
            "open",
            "2026-11-19T23:50:00+00:00",
            agent_minutes=4,
            bank_used_minutes=3,
            deposit_used="1.00",
        )
    ]

    d1_accounts = read_rows(directory / "2026-11-20.csv")
    assert d1_accounts == [
        # calls 1 and 2 settled. Minutes: -2 (call 1's correction) + 4 (call 2) = 2.
        # Bank: 0 + (-1 given back + 1 taken) = 0 used, +1 waived: closes at 1.
        # Deposit: 19.00 + 5.00 - (-1.00 + 3.00) + 3.00 waived = 25.00.
        account_row(
            D1,
            "acme",
            calls=2,
            agent_minutes=2,
            bank_waived_minutes=1,
            bank_closing_minutes=1,
            deposit_opening="19.00",
            deposit_paid_in="5.00",
            deposit_used="2.00",
            deposit_waived="3.00",
            deposit_closing="25.00",
            waivers=1,
        ),
        account_row(
            D1,
            "globex",
            calls=1,
            agent_minutes=30,
            deposit_opening="100.00",
            deposit_used="50.00",
            deposit_closing="50.00",
            incidents=1,
        ),
        account_row(D1, "initech", calls=1, agent_minutes=3, hold_seconds=30, research_seconds=60),
    ]
    d1_calls = read_rows(directory / "2026-11-20.calls.csv")
    assert d1_calls == [
        call_row(
            D1,
            call1.call_sid,
            "acme",
            "per_minute",
            "settled",
            "2026-11-19T23:50:00+00:00",
            ended_at="2026-11-19T23:52:00+00:00",
            settled_at="2026-11-20T00:10:00+00:00",
            agents="alice",
            hold_seconds=0,
            active_seconds=120,
            research_seconds=0,
            billable_seconds=120,
            call_agent_minutes=2,
            agent_minutes=-2,
            bank_used_minutes=-1,
            deposit_used="-1.00",
        ),
        call_row(
            D1,
            call2.call_sid,
            "acme",
            "per_minute",
            "settled",
            "2026-11-20T10:00:00+00:00",
            ended_at="2026-11-20T10:02:30+00:00",
            settled_at="2026-11-20T10:04:00+00:00",
            agents="alice bob",
            hold_seconds=0,
            active_seconds=210,
            research_seconds=0,
            billable_seconds=210,
            call_agent_minutes=4,
            agent_minutes=4,
            bank_used_minutes=1,
            deposit_used="3.00",
            bank_waived_minutes=1,
            deposit_waived="3.00",
            waiver_reason="software_defect (agent alice)",
        ),
        call_row(
            D1,
            call3.call_sid,
            "globex",
            "per_incident",
            "settled",
            "2026-11-20T12:00:00+00:00",
            ended_at="2026-11-20T12:30:00+00:00",
            settled_at="2026-11-20T12:32:00+00:00",
            agents="alice",
            hold_seconds=0,
            active_seconds=1800,
            research_seconds=0,
            billable_seconds=1800,
            call_agent_minutes=30,
            agent_minutes=30,
            deposit_used="50.00",
            incidents=1,
        ),
        call_row(
            D1,
            call4.call_sid,
            "initech",
            "service_agreement",
            "settled",
            "2026-11-20T13:00:00+00:00",
            ended_at="2026-11-20T13:02:30+00:00",
            settled_at="2026-11-20T13:05:00+00:00",
            agents="alice",
            hold_seconds=30,
            active_seconds=120,
            research_seconds=60,
            billable_seconds=180,
            call_agent_minutes=3,
            agent_minutes=3,
        ),
    ]
    # the call view agrees on the time of the call
    assert view4["hold_seconds"] == 30 and view4["agents"]["alice"]["agent_minutes"] == 3
    for accounts, calls in [(d0_accounts, d0_calls), (d1_accounts, d1_calls)]:
        assert_reconciles(accounts, calls)

    document = json.loads((directory / "2026-11-20.json").read_text())
    assert document["reconciled"] is True
    assert [a["account_id"] for a in document["accounts"]] == ["acme", "globex", "initech"]
    assert document["accounts"][0]["deposit_closing"] == "25.00"
    assert document["accounts"][0]["deposit_closing_minor"] == 2500
    (usd,) = document["totals"]
    assert (usd["accounts"], usd["agent_minutes"], usd["deposit_used"]) == (3, 35, "52.00")
    assert document["calls_csv"]["rows"] == 4


# --- 2. business days with daylight saving; a call across midnight ---------------------------


async def test_the_23_and_25_hour_days_of_new_york_are_cut_at_local_midnight(
    aiohttp_client, database, tmp_path, clock
):
    clock.now = utc(2026, 3, 1, 12)
    client = await aiohttp_client(make_app(database, tmp_path, clock, NY))
    await create_account(client, "acme", "per_minute", ACME)
    paid = [
        (utc(2026, 3, 8, 4, 59, 59), 1),  # 2026-03-07 23:59:59 EST
        (utc(2026, 3, 8, 5, 0, 0), 10),  # 2026-03-08 00:00 EST: the 23-hour day begins
        (utc(2026, 3, 9, 3, 59, 59), 100),  # 2026-03-08 23:59:59 EDT
        (utc(2026, 3, 9, 4, 0, 0), 1000),  # 2026-03-09 00:00 EDT
        (utc(2026, 11, 1, 3, 59, 59), 1),  # 2026-10-31 23:59:59 EDT
        (utc(2026, 11, 1, 4, 0, 0), 10),  # 2026-11-01 00:00 EDT: the 25-hour day begins
        (utc(2026, 11, 1, 5, 30), 20),  # 01:30 EDT
        (utc(2026, 11, 1, 6, 30), 40),  # 01:30 EST, the second time
        (utc(2026, 11, 2, 4, 59, 59), 100),  # 2026-11-01 23:59:59 EST
        (utc(2026, 11, 2, 5, 0, 0), 1000),  # 2026-11-02 00:00 EST
    ]
    for n, (at, amount) in enumerate(paid):
        clock.now = at
        await deposit(client, "acme", amount, f"p{n}")
    clock.now = utc(2026, 11, 3, 12)
    usage = usage_of(client)
    for day in (dt.date(2026, 3, 8), dt.date(2026, 11, 1)):
        await usage.build(day)

    spring = json.loads(usage.path(dt.date(2026, 3, 8), UsageFile.ACCOUNTS_JSON).read_text())
    assert (spring["from"], spring["to"]) == (
        "2026-03-08T05:00:00+00:00",
        "2026-03-09T04:00:00+00:00",
    )
    assert spring["length_seconds"] == 23 * 3600
    (acme,) = spring["accounts"]
    # 10 + 100 in the day; 1 before it
    assert (acme["deposit_opening"], acme["deposit_paid_in"], acme["deposit_closing"]) == (
        "0.01",
        "1.10",
        "1.11",
    )

    autumn = json.loads(usage.path(dt.date(2026, 11, 1), UsageFile.ACCOUNTS_JSON).read_text())
    assert autumn["length_seconds"] == 25 * 3600
    (acme,) = autumn["accounts"]
    # 10 + 20 + 40 + 100 in the day; 1 + 10 + 100 + 1000 + 1 before it
    assert (acme["deposit_opening"], acme["deposit_paid_in"], acme["deposit_closing"]) == (
        "11.12",
        "1.70",
        "12.82",
    )


async def test_a_call_across_midnight_is_reported_by_its_postings(
    aiohttp_client, database, tmp_path, clock
):
    clock.now = utc(2026, 11, 20, 12)
    client = await aiohttp_client(make_app(database, tmp_path, clock, NY))
    await create_account(client, "acme", "per_minute", ACME, products=LICENCE)  # 45 minutes
    # 23:58 in New York on 2026-11-20 (04:58 UTC the next day): alice talks 240 s
    call = await place_call(client, clock, 1, ACME, utc(2026, 11, 21, 4, 58))
    call.join("customer", 0).join("agent:alice", 0)
    await deliver(client, call.events)
    # minutes 1 (at 0 s) and 2 (past 60 s) are taken before midnight, 3 and 4 after
    await tick_until(client, clock, utc(2026, 11, 21, 5, 2))
    call.leave("agent:alice", 240).end(240)
    await deliver(client, call.events[3:] + call.status_events)
    await settle_at(client, clock, call, utc(2026, 11, 21, 5, 4))

    clock.now = utc(2026, 11, 22, 5, 30)  # 00:30 in New York on 2026-11-22
    usage = usage_of(client)
    assert await usage.catch_up() == [D1, D2]
    before = read_rows(usage.path(D1, UsageFile.CALLS_CSV))
    after = read_rows(usage.path(D2, UsageFile.CALLS_CSV))
    assert [(r["status"], r["agent_minutes"], r["bank_used_minutes"]) for r in before] == [
        ("open", "2", "2")
    ]
    assert [
        (r["status"], r["agent_minutes"], r["call_agent_minutes"], r["settled_at"]) for r in after
    ] == [("settled", "2", "4", "2026-11-21T05:04:00+00:00")]
    (d1,) = read_rows(usage.path(D1, UsageFile.ACCOUNTS_CSV))
    (d2,) = read_rows(usage.path(D2, UsageFile.ACCOUNTS_CSV))
    assert (d1["calls"], d1["agent_minutes"], d1["bank_closing_minutes"]) == ("0", "2", "43")
    assert (d2["calls"], d2["agent_minutes"], d2["bank_opening_minutes"]) == ("1", "2", "43")
    assert d2["bank_closing_minutes"] == "41"


# --- 3. missed nights, restarts, two daemons --------------------------------------------------


async def test_two_missed_nights_are_caught_up_and_only_once(client, clock, tmp_path):
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 100, "d0")  # 2026-11-19
    clock.now = utc(2026, 11, 20, 0, 30)
    assert await usage_of(client).catch_up() == [D0]
    # meterd is down for the nights of D1 and D2; money still arrives
    clock.now = utc(2026, 11, 20, 12)
    await deposit(client, "acme", 200, "d1")
    clock.now = utc(2026, 11, 21, 12)
    await deposit(client, "acme", 400, "d2")
    # back at 00:10 on 2026-11-22, before the nightly run: the start-up catch-up builds both
    clock.now = utc(2026, 11, 22, 0, 10)
    assert await usage_of(client).catch_up() == [D1, D2]
    assert await usage_of(client).catch_up() == []
    paid = [
        read_rows(usage_of(client).path(day, UsageFile.ACCOUNTS_CSV))[0]["deposit_paid_in"]
        for day in (D0, D1, D2)
    ]
    assert paid == ["1.00", "2.00", "4.00"]


async def test_two_daemons_on_one_database_build_each_day_once(
    client, clock, tmp_path, database_url
):
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 100, "d0")
    clock.now = utc(2026, 11, 20, 12)
    await deposit(client, "acme", 200, "d1")
    clock.now = utc(2026, 11, 22, 0, 30)
    settings = UsageSettings(tmp_path / "a", "UTC", 60, 120)
    other_database = await open_database(database_url)
    try:
        a = UsageService(client.app[SERVICES].database, settings, clock, instance="a")
        b = UsageService(
            other_database, UsageSettings(tmp_path / "b", "UTC", 60, 120), clock, instance="b"
        )
        built_a, built_b = await asyncio.gather(a.catch_up(), b.catch_up())
        assert sorted(built_a + built_b) == [D0, D1, D2]  # each day by exactly one of them
        async with other_database.read() as connection:
            runs = (await connection.execute(select(usage_runs))).all()
        assert sorted(r.business_day for r in runs) == [D0, D1, D2]
        assert {r.status for r in runs} == {"published"}
        for day in (D0, D1, D2):
            here = [s.path(day, UsageFile.ACCOUNTS_CSV).exists() for s in (a, b)]
            assert here.count(True) == 1
        # b serves a day a built: rebuilt here, proven identical to what a published
        day = built_a[0]
        path = await b.published_file(day, UsageFile.ACCOUNTS_CSV)
        assert path.read_bytes() == a.path(day, UsageFile.ACCOUNTS_CSV).read_bytes()
    finally:
        await other_database.close()


async def test_a_claim_left_by_a_dead_builder_is_taken_over_after_its_lease(
    client, clock, database
):
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 100, "d0")
    clock.now = utc(2026, 11, 20, 0, 30)
    async with database.write() as connection:
        await connection.execute(
            usage_runs.insert().values(
                business_day=D0,
                status="building",
                claimed_by="dead",
                claimed_at=clock.now,
                created_at=clock.now,
            )
        )
    assert await usage_of(client).catch_up() == []  # a fresh claim: someone is building it
    clock.advance(LEASE_SECONDS + 1)
    assert await usage_of(client).catch_up() == [D0]


async def test_the_daemon_catches_up_missed_nights_when_it_starts(database, database_url, tmp_path):
    """The real `meterd run`: the job at start builds the days it missed."""
    now = dt.datetime.now(UTC)
    last = last_closed_day(now, "UTC", CLOSE_MARGIN_SECONDS)
    missed = [last - dt.timedelta(days=1), last]
    state_dir = tmp_path / "state"
    settings = UsageSettings(state_dir, "UTC", 60, 120)

    def at(day: dt.date, hour: int) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(hour), tzinfo=UTC)

    published = missed[0] - dt.timedelta(days=1)
    accounts = AccountService(
        database, AccountSettings("USD", 0, "pin-secret-0123456789abcdef"), lambda: at(published, 1)
    )
    await accounts.create({"account_id": "acme", "name": "Acme", "plan": "per_minute"})
    async with database.write() as connection:
        for n, day in enumerate([published, *missed]):
            await ledger_store.post(
                connection, ledger.deposit("acme", "USD", 100 << n, f"r{n}"), at(day, 12)
            )
    assert await UsageService(database, settings, lambda: at(missed[0], 1)).catch_up() == [
        published
    ]
    daemon = Daemon(
        tmp_path,
        env={
            "METERD_DATABASE_URL": database_url,
            "METERD_STATE_DIR": str(state_dir),
            "METERD_FINANCE_TOKEN": FINANCE,
        },
    ).start()
    try:
        paths = [state_dir / "usage" / f"{day}.csv" for day in missed]
        assert await asyncio.to_thread(_appear, paths, 30), daemon.log()
        status, body = daemon.request("GET", f"/finance/usage/{last}.json", token=FINANCE)
        assert status == 200, body
        assert body["accounts"][0]["deposit_paid_in_minor"] == 400
    finally:
        assert daemon.stop() == 0, daemon.log()


def _appear(paths: list[Path], timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def test_the_nightly_job_is_a_cron_job_in_the_business_timezone():
    scheduler = Scheduler(lambda error: None)

    async def nothing() -> None:
        return None

    scheduler.cron("30 0 * * *", NY, "usage-nightly", nothing)
    scheduler.start()
    try:
        job = scheduler.apscheduler.get_job("usage-nightly")
        assert (job.misfire_grace_time, job.coalesce, job.max_instances) == (3600, True, 1)
        local = job.next_run_time.astimezone(dt.timezone(job.next_run_time.utcoffset()))
        assert (local.hour, local.minute) == (0, 30)
        assert str(job.trigger.timezone) == NY
    finally:
        scheduler.shutdown()


# --- 4. tokens, and what is not there ----------------------------------------------------------


async def _published_day(client, clock) -> None:
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 1234, "d0")
    clock.now = utc(2026, 11, 20, 0, 30)
    assert await usage_of(client).catch_up() == [D0]


async def test_only_the_finance_token_reads_finance(client, clock):
    await _published_day(client, clock)
    for path in (
        "/finance/usage/2026-11-19.csv",
        "/finance/usage/2026-11-19.json",
        "/finance/usage/2026-11-19/calls.csv",
    ):
        ok = await client.get(path, headers={"Authorization": f"Bearer {FINANCE}"})
        assert ok.status == 200, path
        for token in (ADMIN, AGENTS, "not-a-token-0123456789abcdef"):
            response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert response.status == 403, (path, token)
        assert (await client.get(path)).status == 401
    response = await client.get(
        "/admin/accounts/acme", headers={"Authorization": f"Bearer {FINANCE}"}
    )
    assert response.status == 403  # the finance token opens /finance/* only
    csv_response = await client.get(
        "/finance/usage/2026-11-19.csv", headers={"Authorization": f"Bearer {FINANCE}"}
    )
    assert csv_response.content_type == "text/csv"
    body = await csv_response.text()
    assert "acme,USD" in body and ",12.34," in body


async def test_a_day_not_closed_or_in_the_future_is_404_and_an_impossible_date_400(client, clock):
    await _published_day(client, clock)  # now 00:30 on 2026-11-20

    async def get(path):
        response = await client.get(path, headers={"Authorization": f"Bearer {FINANCE}"})
        return response.status, await response.json()

    status, body = await get("/finance/usage/2026-11-20.csv")
    assert status == 404 and body["error"] == "usage_not_ready"
    assert (
        "2026-11-20 (UTC) has not closed yet: it ends at 2026-11-21T00:00:00+00:00"
        in (body["detail"])
    )
    status, body = await get("/finance/usage/2026-11-21/calls.csv")
    assert status == 404 and "2026-11-21 is in the future" in body["detail"]
    status, body = await get("/finance/usage/2026-11-18.json")  # closed, never built
    assert status == 404 and "has not been built yet" in body["detail"]
    for impossible in ("2026-02-30", "2026-13-01", "20261119", "tomorrow"):
        status, body = await get(f"/finance/usage/{impossible}.csv")
        assert status == 400 and body["error"] == "invalid_date", impossible


# --- 5. regenerating; a tampered ledger ---------------------------------------------------------


async def test_regenerating_a_day_gives_the_same_bytes(client, clock, tmp_path, database_url):
    await create_account(client, "acme", "per_minute", ACME, products=LICENCE)
    await deposit(client, "acme", 1234, "d0")
    call = await place_call(client, clock, 1, ACME, utc(2026, 11, 19, 15))
    call.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 90).end(90)
    await deliver(client, call.events + call.status_events)
    await settle_at(client, clock, call, utc(2026, 11, 19, 15, 3))
    clock.now = utc(2026, 11, 20, 0, 30)
    usage = usage_of(client)
    assert await usage.catch_up() == [D0]
    published = {kind: usage.path(D0, kind).read_bytes() for kind in UsageFile}

    await usage.build(D0, regenerate=True)
    assert {kind: usage.path(D0, kind).read_bytes() for kind in UsageFile} == published

    # a file lost here (or served by another daemon) is rebuilt, byte for byte
    for kind in UsageFile:
        usage.path(D0, kind).unlink()
    response = await client.get(
        "/finance/usage/2026-11-19/calls.csv", headers={"Authorization": f"Bearer {FINANCE}"}
    )
    assert response.status == 200
    assert await response.read() == published[UsageFile.CALLS_CSV]
    # and a damaged one too
    usage.path(D0, UsageFile.ACCOUNTS_JSON).write_text("{}")
    response = await client.get(
        "/finance/usage/2026-11-19.json", headers={"Authorization": f"Bearer {FINANCE}"}
    )
    assert await response.read() == published[UsageFile.ACCOUNTS_JSON]

    # the command line, in its own process: the same bytes on stdout
    env = {
        "METERD_DATABASE_URL": database_url,
        "METERD_STATE_DIR": str(tmp_path),
        "METERD_FINANCE_TOKEN": FINANCE,
    }
    result = run_cli(["usage", "--date", "2026-11-19", "--regenerate"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == published[UsageFile.ACCOUNTS_CSV].decode().replace("\r\n", "\n")
    assert "identical to what was published" in result.stderr
    result = run_cli(["usage", "--date", "2026-11-19", "--format", "json"], env, tmp_path)
    assert json.loads(result.stdout) == json.loads(published[UsageFile.ACCOUNTS_JSON])
    result = run_cli(["usage", "--date", "2026-02-30"], env, tmp_path)
    assert result.returncode == 2 and "2026-02-30 is not a date" in result.stderr


async def test_a_published_day_that_rebuilds_differently_is_never_served(client, clock, database):
    await _published_day(client, clock)
    usage = usage_of(client)
    async with database.write() as connection:
        await connection.execute(
            update(usage_runs).values(accounts_csv_sha256="0" * 64)  # what was "published"
        )
    usage.path(D0, UsageFile.ACCOUNTS_CSV).unlink()
    with structlog.testing.capture_logs() as logs:
        response = await client.get(
            "/finance/usage/2026-11-19.csv", headers={"Authorization": f"Bearer {FINANCE}"}
        )
    assert response.status == 500
    assert (await response.json())["error"] == "usage_mismatch"
    assert any(e["log_level"] == "critical" for e in logs)
    with pytest.raises(UsageMismatch):
        await usage.build(D0, regenerate=True)


def _drop_guard(dialect: str) -> str:
    if dialect == "sqlite":
        return "DROP TRIGGER ledger_postings_no_update"
    return "ALTER TABLE ledger_postings DISABLE TRIGGER ledger_postings_append_only"


async def test_a_tampered_posting_makes_the_report_refuse_and_say_why(
    client, clock, database, database_url, tmp_path
):
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 500, "d0")
    async with database.write() as connection:
        await connection.execute(text(_drop_guard(database.dialect)))
        await connection.execute(
            text("UPDATE ledger_postings SET amount = 900 WHERE book = 'customer:acme:deposit'")
        )
    clock.now = utc(2026, 11, 20, 0, 30)
    with structlog.testing.capture_logs() as logs, pytest.raises(LedgerBroken) as caught:
        await usage_of(client).catch_up()
    why = str(caught.value)
    assert isinstance(caught.value, InvariantBroken)  # the nightly job stops the daemon
    assert "[transaction balances]" in why and "sums to 400 USD, not 0" in why
    assert (
        "[balance equals the sum of postings] book customer:acme:deposit holds 500 but its "
        "postings sum to 900"
    ) in why
    alert = next(e for e in logs if e["log_level"] == "critical")
    assert alert["event"] == "usage NOT published" and "sums to 400 USD" in alert["reason"]
    assert not any((tmp_path / "usage").glob("*"))  # nothing published, no litter

    response = await client.get(
        "/finance/usage/2026-11-19.csv", headers={"Authorization": f"Bearer {FINANCE}"}
    )
    body = await response.json()
    assert response.status == 409 and body["error"] == "usage_refused"
    assert (
        "the ledger fails its invariants" in body["detail"] and "sums to 400 USD" in body["detail"]
    )

    result = run_cli(
        ["usage", "--date", "2026-11-19"],
        {"METERD_DATABASE_URL": database_url, "METERD_STATE_DIR": str(tmp_path)},
        tmp_path,
    )
    assert result.returncode == 1 and "sums to 400 USD, not 0" in result.stderr
    assert result.stdout == ""


async def test_entries_the_report_cannot_explain_refuse_the_day_without_stopping(
    client, clock, database, tmp_path
):
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 500, "d0")
    chargeback = ledger.transfer(
        "chargeback:1",
        "card_chargeback",
        unit="USD",
        amount=200,
        from_book=ledger.deposit_book("acme"),
        to_book="system:USD:chargebacks",
        account_id="acme",
    )
    async with database.write() as connection:
        await ledger_store.post(connection, chargeback, clock.now)
    clock.now = utc(2026, 11, 20, 0, 30)
    with structlog.testing.capture_logs() as logs:
        assert await usage_of(client).catch_up() == []  # refused; no exception: keeps running
    alert = next(e for e in logs if e["log_level"] == "critical")
    assert "card_chargeback on the deposit" in alert["reason"]
    assert "off by -2.00 USD" in alert["reason"]
    async with database.read() as connection:
        run = (await connection.execute(select(usage_runs))).one()
    assert run.status == "refused" and "cannot classify: card_chargeback" in run.detail
    assert not any((tmp_path / "usage").glob("*"))
    clock.advance(86400)  # the next night: 2026-11-19 is tried again (and refused again)
    with structlog.testing.capture_logs() as logs:
        assert await usage_of(client).catch_up() == [D1]  # a clean day is published
    assert [e["business_day"] for e in logs if e["log_level"] == "critical"] == ["2026-11-19"]


def test_usage_settings_come_from_the_daemon_settings(tmp_path):
    settings = load_settings(
        None,
        {
            "METERD_STATE_DIR": str(tmp_path),
            "METERD_BUSINESS_TIMEZONE": NY,
            "METERD_FINANCE_TOKEN": FINANCE,
        },
    )
    assert UsageSettings.of(settings) == UsageSettings(tmp_path.resolve(), NY, 60, 120)


async def test_temporary_files_left_by_a_dead_build_are_cleared(client, clock, tmp_path):
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 100, "d0")
    directory = tmp_path / "usage"
    directory.mkdir()
    stale = directory / ".2026-11-19.csv.dead.tmp"
    stale.write_text("half a report")
    old = time.time() - LEASE_SECONDS - 60
    os.utime(stale, (old, old))
    clock.now = utc(2026, 11, 20, 0, 30)
    assert await usage_of(client).catch_up() == [D0]
    assert sorted(p.name for p in directory.iterdir()) == [
        "2026-11-19.calls.csv",
        "2026-11-19.csv",
        "2026-11-19.json",
    ]


# --- 6. direction: a callback's row (issue 17) ---------------------------------------------------


def builder_into(database, clock, directory: Path) -> UsageBuilder:
    """A builder as the service's (UTC, 60 s increments, research up to 120 minutes)."""
    return UsageBuilder(
        database,
        clock,
        directory,
        timezone="UTC",
        increment_seconds=60,
        research_max_minutes=120,
    )


async def _two_calls_settled(client, clock) -> tuple[CallScript, CallScript]:
    """acme pays in 10.00 on D0; alice talks 150 s (3 minutes, 3.00) on call 1 and 90 s (2
    minutes, 2.00) on call 2, both settled on D0."""
    await create_account(client, "acme", "per_minute", ACME)
    await deposit(client, "acme", 1000, "d0")
    scripts = []
    for n, hour, talk_seconds in ((1, 10, 150), (2, 11, 90)):
        script = await place_call(client, clock, n, ACME, utc(2026, 11, 19, hour))
        script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", talk_seconds)
        script.end(talk_seconds)
        await deliver(client, script.events + script.status_events)
        await settle_at(client, clock, script, utc(2026, 11, 19, hour, 5))
        scripts.append(script)
    clock.now = utc(2026, 11, 20, 0, 30)
    return scripts[0], scripts[1]


async def test_a_callback_s_row_says_outbound_and_the_accounts_are_unchanged(
    client, clock, database, tmp_path
):
    inbound, outbound = await _two_calls_settled(client, clock)
    # the same day built while both calls were inbound, to compare with
    before = await builder_into(database, clock, tmp_path / "before").build(D0, heartbeat=None)
    before.commit()
    await make_outbound(database, outbound.call_sid)
    usage = usage_of(client)
    assert await usage.catch_up() == [D0]

    calls_path = usage.path(D0, UsageFile.CALLS_CSV)
    header = calls_path.read_bytes().split(b"\r\n")[0].decode().split(",")
    assert header == [name for name, _ in CALL_COLUMNS] and header[-1] == "direction"
    calls = read_rows(calls_path)
    assert [(c["call_sid"], c["direction"]) for c in calls] == [
        (inbound.call_sid, "inbound"),
        (outbound.call_sid, "outbound"),
    ]
    # nothing but the direction differs from the rows of the day built before
    assert calls == [
        row | {"direction": "outbound" if row["call_sid"] == outbound.call_sid else "inbound"}
        for row in read_rows(tmp_path / "before" / "2026-11-19.calls.csv")
    ]
    accounts = read_rows(usage.path(D0, UsageFile.ACCOUNTS_CSV))
    assert accounts == [
        account_row(
            D0,
            "acme",
            calls=2,
            agent_minutes=5,
            deposit_paid_in="10.00",
            deposit_used="5.00",
            deposit_closing="5.00",
        )
    ]
    assert_reconciles(accounts, calls)
    # the accounts files are the same bytes, but for the calls file's own digest in the JSON
    assert usage.path(D0, UsageFile.ACCOUNTS_CSV).read_bytes() == (
        (tmp_path / "before" / "2026-11-19.csv").read_bytes()
    )
    document = json.loads(usage.path(D0, UsageFile.ACCOUNTS_JSON).read_text())
    earlier = json.loads((tmp_path / "before" / "2026-11-19.json").read_text())
    assert document["calls_csv"]["sha256"] != earlier["calls_csv"]["sha256"]
    assert document | {"calls_csv": None} == earlier | {"calls_csv": None}
    assert document["totals"][0]["calls"] == 2 and document["totals"][0]["deposit_used"] == "5.00"


async def test_a_day_published_before_direction_is_served_and_rebuilt_as_it_was(
    client, clock, database
):
    await _two_calls_settled(client, clock)
    usage = usage_of(client)
    assert await usage.catch_up() == [D0]
    # the day as a meterd before issue 17 published it: no direction column
    legacy = await builder_into(database, clock, usage.directory).build(
        D0, heartbeat=None, call_columns=CALL_COLUMNS_BEFORE_DIRECTION
    )
    legacy.commit()
    async with database.write() as connection:
        await connection.execute(
            update(usage_runs).values(
                {kind.sha_column: digest for kind, digest in legacy.sha256.items()}
            )
        )
    published = {kind: usage.path(D0, kind).read_bytes() for kind in UsageFile}
    assert b"direction" not in published[UsageFile.CALLS_CSV]
    finance = {"Authorization": f"Bearer {FINANCE}"}
    response = await client.get("/finance/usage/2026-11-19/calls.csv", headers=finance)
    assert response.status == 200 and await response.read() == published[UsageFile.CALLS_CSV]

    # lost here (or built by another daemon): rebuilt in the layout it was published in
    for kind in UsageFile:
        usage.path(D0, kind).unlink()
    response = await client.get("/finance/usage/2026-11-19/calls.csv", headers=finance)
    assert response.status == 200, await response.text()
    assert await response.read() == published[UsageFile.CALLS_CSV]
    await usage.build(D0, regenerate=True)
    assert {kind: usage.path(D0, kind).read_bytes() for kind in UsageFile} == published
