"""Live metering and settlement, in-process with a controlled clock, on SQLite and PostgreSQL.
Every figure is worked out by hand beside its assertion. Default rate: 100 minor units (1.00) per
agent-minute; incidents 5000 (50.00); increment 60 s."""

from __future__ import annotations

import datetime as dt

import pytest

from meterd.services.ledger_check import check_ledger
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript

from .twilio_app import ManualClock, admin, agents, build_app, post_twilio

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
LICENCE = [{"product": "desktop", "kind": "license"}]


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    return await aiohttp_client(
        build_app(database, tmp_path, clock, METERD_SETTLE_DELAY_SECONDS="60")
    )


def metering(client):
    return client.app[SERVICES].metering


async def account(client, plan="per_minute", products=LICENCE, deposit_minor=0, **fields):
    body = {
        "account_id": "acme",
        "name": "Acme",
        "plan": plan,
        "caller_ids": [CUSTOMER_NUMBER],
        "products": products,
        **fields,
    }
    assert (await admin(client, "POST", "/admin/accounts", body)).status == 201
    if deposit_minor:
        response = await admin(
            client,
            "POST",
            "/admin/accounts/acme/deposits",
            {"amount_minor": deposit_minor, "reference": "d1"},
        )
        assert response.status == 201


async def balances(client) -> tuple[int, int]:
    view = await (await admin(client, "GET", "/admin/accounts/acme")).json()
    return view["bank_minutes"], view["deposit_minor"]


async def call_view(client, script):
    return await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()


async def deliver(client, params_list):
    for params in params_list:
        path = "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status"
        assert (await post_twilio(client, path, params)).status == 204


async def start_call(client, n=1) -> CallScript:
    script = CallScript(n, START)
    twiml = await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    assert "<Conference" in twiml, twiml
    return script


async def run_until(client, clock, offset_seconds: int, step: int = 1) -> None:
    """Advance the clock second by second to START + offset, ticking as the daemon would."""
    target = START + dt.timedelta(seconds=offset_seconds)
    while clock.now < target:
        clock.advance(step)
        await metering(client).tick()


async def finish(client, clock, script, end_offset):
    """Let the call end, pass the settlement delay, and settle."""
    clock.now = max(clock.now, START + dt.timedelta(seconds=end_offset + 61))
    await metering(client).tick()
    assert (await call_view(client, script))["settled_at"] is not None


async def test_live_minutes_are_posted_while_the_call_is_up(client, clock, database):
    await account(client)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await run_until(client, clock, 150)
    # billable 150 s: minutes 1 (at 0 s), 2 (past 60 s) and 3 (past 120 s) are taken
    assert await balances(client) == (45 - 3, 0)
    view = await call_view(client, script)
    assert view["status"] == "connected" and view["charges"]["bank_minutes"] == 3
    await run_until(client, clock, 181)
    assert await balances(client) == (45 - 4, 0)  # minute 4 once billable passed 180 s
    assert (await check_ledger(database)).ok


async def test_bank_first_then_deposit_for_a_50_agent_minute_call(client, clock, database):
    await account(client, deposit_minor=2000)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 3000).end(3000)
    await deliver(client, script.events[:3])
    await run_until(client, clock, 3000, step=20)
    await deliver(client, script.events[3:] + script.status_events)
    await finish(client, clock, script, 3000)
    # 3000 s = 50 agent-minutes: 45 from the bank, then 5 x 100 = 500 from the deposit
    assert await balances(client) == (0, 2000 - 500)
    view = await call_view(client, script)
    assert view["charges"]["bank_minutes"] == 45 and view["charges"]["deposit_minor"] == 500
    assert view["agents"]["alice"]["agent_minutes"] == 50
    assert (await check_ledger(database)).ok


async def test_deposit_only(client, clock):
    await account(client, products=[], deposit_minor=1000)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 250).end(250)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 250)
    # 250 s = ceil(4.17) = 5 agent-minutes x 100 = 500 from the deposit
    assert await balances(client) == (0, 500)


async def test_two_agents_at_once_pay_per_agent(client, clock):
    await account(client, products=[], deposit_minor=5000)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).join("agent:bob", 0)
    script.leave("agent:bob", 120).leave("agent:alice", 180).end(180)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 180)
    # alice 180 s = 3 minutes, bob 120 s = 2 minutes: 5 agent-minutes x 100 = 500
    assert await balances(client) == (0, 4500)


async def test_hold_is_never_charged_and_research_on_hold_is(client, clock):
    await account(client, products=[], deposit_minor=5000)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).hold("customer", 60)
    script.unhold("customer", 600).leave("agent:alice", 660).end(660)
    await deliver(client, script.events + script.status_events)
    body = {
        "call_sid": script.call_sid,
        "agent_id": "alice",
        "start": script.at(300).isoformat(),
        "end": script.at(420).isoformat(),
    }
    clock.now = START + dt.timedelta(seconds=700)
    assert (await agents(client, "/agents/research", body)).status == 200
    await finish(client, clock, script, 700)
    # active 0..60 and 600..660 (120 s) + research 300..420 on hold (120 s) = 240 s = 4 minutes
    # the other 420 s of hold (60..300, 420..600) cost nothing: 4 x 100 = 400
    assert await balances(client) == (0, 4600)
    view = await call_view(client, script)
    assert view["hold_seconds"] == 540  # 60..600, recorded (research does not shorten it)


async def test_settlement_gives_back_minutes_the_final_timeline_does_not_support(
    client, clock, database
):
    await account(client)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 100).end(100)
    await deliver(client, script.events[:3])
    await run_until(client, clock, 200)  # the leave is late: live counts to 200 s, 4 minutes
    assert await balances(client) == (41, 0)
    await deliver(client, script.events[3:] + script.status_events)
    await finish(client, clock, script, 200)
    # the final timeline: 100 s = 2 minutes; minutes 3 and 4 are given back
    assert await balances(client) == (43, 0)
    assert (await call_view(client, script))["charges"]["bank_minutes"] == 2
    assert (await check_ledger(database)).ok


async def test_a_service_agreement_is_metered_at_zero_price(client, clock):
    await account(client, plan="service_agreement", deposit_minor=1000)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 300).end(300)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 300)
    assert await balances(client) == (45, 1000)
    view = await call_view(client, script)
    assert view["agents"]["alice"]["agent_minutes"] == 5
    assert view["charges"]["bank_minutes"] == 0 and view["charges"]["deposit_minor"] == 0
    ledger = await (await admin(client, "GET", f"/admin/ledger?call_sid={script.call_sid}")).json()
    assert [t["kind"] for t in ledger["transactions"]] == ["minute_covered"] * 5


async def test_the_rate_in_force_when_each_minute_is_taken(client, clock):
    await account(client, products=[], deposit_minor=10_000)
    response = await admin(
        client,
        "POST",
        "/admin/rates",
        {
            "kind": "per_agent_minute",
            "currency": "USD",
            "amount_minor": 250,
            "effective_from": (START + dt.timedelta(seconds=90)).isoformat(),
        },
    )
    assert response.status == 201
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 180).end(180)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 180)
    # minute 1 due at 0 s and minute 2 at 60 s: 100 each; minute 3 due at 120 s: 250
    assert await balances(client) == (0, 10_000 - 450)


# --- per incident ---------------------------------------------------------------------------


async def test_two_hours_ten_minutes_is_two_incidents(client, clock, database):
    await account(client, plan="per_incident", deposit_minor=20_000)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 7800).end(7800)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 7800)
    # 7800 s = 2 h 10 min: ceil(7800 / 7200) = 2 incidents x 5000
    assert await balances(client) == (45, 20_000 - 10_000)
    assert (await call_view(client, script))["charges"]["incidents"] == 2
    assert (await check_ledger(database)).ok


async def test_a_linked_follow_up_shares_the_incident(client, clock):
    await account(client, plan="per_incident", deposit_minor=20_000)
    first = await start_call(client, 1)
    first.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 1800).end(1800)
    await deliver(client, first.events + first.status_events)
    await finish(client, clock, first, 1800)
    assert await balances(client) == (45, 15_000)  # 30 minutes: one incident
    follow_up = CallScript(2, clock.now)
    assert (
        "<Conference"
        in await (await post_twilio(client, "/twilio/voice", follow_up.voice())).text()
    )
    link = await agents(
        client,
        "/agents/incident-link",
        {"call_sid": follow_up.call_sid, "incident_call_sid": first.call_sid},
    )
    assert link.status == 200
    follow_up.join("customer", 0).join("agent:bob", 0).leave("agent:bob", 3600).end(3600)
    await deliver(client, follow_up.events + follow_up.status_events)
    clock.now = follow_up.at(3600 + 61)
    await metering(client).tick()
    # 30 min + 60 min = 90 min of the same incident: still one incident, nothing more
    assert await balances(client) == (45, 15_000)


async def test_no_billable_time_no_incident(client, clock):
    await account(client, plan="per_incident", deposit_minor=20_000)
    script = await start_call(client)
    script.join("customer", 0).end(300)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 300)
    assert await balances(client) == (45, 20_000)


async def test_an_incident_with_no_deposit_is_owed(client, clock):
    await account(client, plan="per_incident")
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 60).end(60)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 60)
    view = await call_view(client, script)
    assert view["charges"]["owed_minor"] == 5000 and view["charges"]["incidents"] == 1


# --- waivers --------------------------------------------------------------------------------


async def test_a_waiver_returns_every_minute_and_cent_once(client, clock, database):
    await account(client, deposit_minor=1000)
    await admin(
        client, "POST", "/admin/accounts/acme/minutes", {"minutes": 0 + 1, "reference": "x"}
    )
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 2940).end(2940)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, 2940)
    # 2940 s = 49 minutes: 46 banked, then 3 x 100 from the deposit
    assert await balances(client) == (0, 700)
    body = {"call_sid": script.call_sid, "agent_id": "alice", "reason": "software_defect"}
    first = await (await agents(client, "/agents/waiver", body)).json()
    second = await (await agents(client, "/agents/waiver", body)).json()
    assert first["outcome"] == "waived" and first["charges_reversed"] == 49
    assert second["outcome"] == "already_waived" and second["charges_reversed"] == 0
    assert await balances(client) == (46, 1000)
    view = await call_view(client, script)
    assert view["charges"]["waived"] is True
    assert view["charges"]["bank_minutes"] == 0 and view["charges"]["deposit_minor"] == 0
    assert (await check_ledger(database)).ok


async def test_a_waiver_during_the_call_covers_minutes_taken_after_it(client, clock):
    await account(client)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await run_until(client, clock, 90)
    body = {"call_sid": script.call_sid, "agent_id": "alice", "reason": "service_outage"}
    assert (await agents(client, "/agents/waiver", body)).status == 200
    script.leave("agent:alice", 300).end(300)
    await deliver(client, script.events[3:] + script.status_events)
    await run_until(client, clock, 300)
    await finish(client, clock, script, 300)
    assert await balances(client) == (45, 0)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"reason": "felt_like_it"}, "reason must be one of"),
        ({"reason": "software_defect", "call_sid": "CAnope"}, "no call"),
    ],
)
async def test_a_bad_waiver_is_refused(client, body, says):
    await account(client)
    script = await start_call(client)
    response = await agents(
        client, "/agents/waiver", {"call_sid": script.call_sid, "agent_id": "alice", **body}
    )
    assert response.status in (400, 404)
    assert says in (await response.json())["detail"]


async def test_a_waiver_after_the_window_is_refused(client, clock):
    await account(client)
    script = await start_call(client)
    script.join("customer", 0).end(10)
    await deliver(client, script.events + script.status_events)
    clock.now = START + dt.timedelta(days=31)
    response = await agents(
        client,
        "/agents/waiver",
        {"call_sid": script.call_sid, "agent_id": "alice", "reason": "software_defect"},
    )
    assert response.status == 400 and "window" in (await response.json())["detail"]


async def test_settlement_posts_minutes_added_after_the_last_tick(client, clock):
    await account(client)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 30).end(30)
    await deliver(client, script.events + script.status_events)
    await run_until(client, clock, 40)
    assert await balances(client) == (44, 0)  # 30 s: one minute taken live
    clock.now = START + dt.timedelta(seconds=400)
    body = {
        "call_sid": script.call_sid,
        "agent_id": "alice",
        "start": script.at(30).isoformat(),
        "end": script.at(330).isoformat(),
    }
    assert (await agents(client, "/agents/research", body)).status == 200
    await metering(client).settle_call(script.call_sid)  # before any tick meters the research
    # active 0..30 + research 30..330 = 330 s = 6 minutes, all from the bank
    assert await balances(client) == (39, 0)
