"""Twilio's webhooks in-process, on SQLite and PostgreSQL: signatures, parsing, who is calling,
the event record, research and the call view."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from sqlalchemy import func, select

from meterd.store.schema import calls, research_marks, webhook_events
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.twilio_payloads import gather_params, sid, sign, voice_params

from .twilio_app import AGENTS, ManualClock, admin, agents, build_app, post_twilio

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    return await aiohttp_client(build_app(database, tmp_path, clock))


async def _rows(database, table) -> int:
    async with database.read() as connection:
        return await connection.scalar(select(func.count()).select_from(table))


async def _account(client, account_id="acme", **fields):
    body = {
        "account_id": account_id,
        "name": "Acme",
        "plan": "service_agreement",
        "caller_ids": [CUSTOMER_NUMBER],
        **fields,
    }
    response = await admin(client, "POST", "/admin/accounts", body)
    assert response.status == 201, await response.text()


async def _connected_call(client, n=1, base=START) -> CallScript:
    script = CallScript(n, base)
    response = await post_twilio(client, "/twilio/voice", script.voice())
    assert "<Conference" in await response.text()
    return script


# --- who is calling -------------------------------------------------------------------------


async def test_a_known_number_is_connected_to_its_own_conference(client):
    await _account(client)
    script = CallScript(1, START)
    response = await post_twilio(client, "/twilio/voice", script.voice())
    assert response.status == 200 and response.content_type == "application/xml"
    twiml = await response.text()
    assert f">{script.call_sid}</Conference>" in twiml
    assert 'participantLabel="customer"' in twiml
    assert 'statusCallback="https://calls.example.com/meterd/twilio/conference"' in twiml
    assert 'statusCallbackEvent="start end join leave hold modify"' in twiml


async def test_an_unknown_number_is_asked_for_the_pin(client):
    response = await post_twilio(client, "/twilio/voice", voice_params(sid("CA", 1), "+15550001"))
    twiml = await response.text()
    assert "<Gather" in twiml and "/meterd/twilio/pin?attempt=1" in twiml
    assert "<Conference" not in twiml and "PIN" in twiml


async def test_a_number_on_two_accounts_is_asked_for_the_pin(client):
    await _account(client, "a1")
    await _account(client, "a2")
    response = await post_twilio(client, "/twilio/voice", CallScript(1, START).voice())
    assert "<Gather" in await response.text()


async def test_pin_right_on_the_second_try_connects(client, database):
    await _account(client, caller_ids=[], pin="246810")
    call_sid = sid("CA", 7)
    await post_twilio(client, "/twilio/voice", voice_params(call_sid, "anonymous"))
    wrong = await post_twilio(client, "/twilio/pin?attempt=1", gather_params(call_sid, "1111"))
    wrong_twiml = await wrong.text()
    assert "not recognised" in wrong_twiml and "/twilio/pin?attempt=2" in wrong_twiml
    right = await post_twilio(client, "/twilio/pin?attempt=2", gather_params(call_sid, "246810"))
    assert f">{call_sid}</Conference>" in await right.text()
    view = await (await admin(client, "GET", f"/admin/calls/{call_sid}")).json()
    assert (view["account_id"], view["status"]) == ("acme", "connected")
    async with database.read() as connection:
        stored = await connection.scalars(select(webhook_events.c.params_json))
        assert not any("246810" in row for row in stored)  # digits are never stored


async def test_pin_wrong_three_times_says_goodbye_and_never_connects(client):
    await _account(client, caller_ids=[], pin="246810")
    call_sid = sid("CA", 8)
    await post_twilio(client, "/twilio/voice", voice_params(call_sid, "+15550002"))
    for attempt in (1, 2):
        response = await post_twilio(
            client, f"/twilio/pin?attempt={attempt}", gather_params(call_sid, "9999")
        )
        assert f"attempt={attempt + 1}" in await response.text()
    last = await post_twilio(client, "/twilio/pin?attempt=3", gather_params(call_sid, "9999"))
    twiml = await last.text()
    assert "could not find your account" in twiml and "<Hangup" in twiml
    assert "<Conference" not in twiml and "<Gather" not in twiml
    again = await post_twilio(client, "/twilio/pin?attempt=3", gather_params(call_sid, "246810"))
    assert "<Conference" not in await again.text()
    view = await (await admin(client, "GET", f"/admin/calls/{call_sid}")).json()
    assert view["status"] == "rejected" and view["account_id"] is None


async def test_a_per_minute_caller_without_funds_is_not_connected(client):
    await _account(client, plan="per_minute")  # no products: no minutes, no deposit
    response = await post_twilio(client, "/twilio/voice", CallScript(1, START).voice())
    twiml = await response.text()
    assert "buy minutes" in twiml and "<Conference" not in twiml


@pytest.mark.parametrize("funding", ["minutes", "deposit"])
async def test_a_per_minute_caller_with_funds_is_connected(client, funding):
    await _account(client, plan="per_minute")
    if funding == "minutes":
        await admin(
            client, "POST", "/admin/accounts/acme/minutes", {"minutes": 1, "reference": "r"}
        )
    else:
        await admin(
            client, "POST", "/admin/accounts/acme/deposits", {"amount_minor": 100, "reference": "r"}
        )  # exactly one agent-minute
    response = await post_twilio(client, "/twilio/voice", CallScript(1, START).voice())
    assert "<Conference" in await response.text()


async def test_an_expired_agreement_falls_back_to_its_plan(client):
    await _account(client, valid_until="2026-01-31", fallback_plan="per_minute")
    response = await post_twilio(client, "/twilio/voice", CallScript(1, START).voice())
    assert "buy minutes" in await response.text()


async def test_a_repeated_voice_webhook_gets_the_same_answer_and_changes_nothing(client, database):
    await _account(client)
    script = CallScript(1, START)
    first = await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    before = await _rows(database, webhook_events)
    second = await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    assert first == second
    assert await _rows(database, webhook_events) == before


async def test_the_fallback_apologises(client):
    response = await post_twilio(
        client,
        "/twilio/fallback",
        voice_params(
            sid("CA", 3), "+15550003", ErrorCode="11200", ErrorUrl="https://x/twilio/voice"
        ),
    )
    twiml = await response.text()
    assert response.status == 200 and "sorry" in twiml and "<Hangup" in twiml


# --- signatures and parsing -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["forged", "missing", "stale token", "changed param"])
async def test_a_bad_signature_gets_403_and_stores_nothing(client, database, how):
    await _account(client)
    params = CallScript(1, START).voice()
    signature = {"forged": "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", "missing": ""}.get(how)
    if how == "stale token":
        response = await post_twilio(
            client, "/twilio/voice", params, token="old-twilio-token-0123456789abcdef"
        )
    elif how == "changed param":
        signature = sign(
            "https://calls.example.com/meterd/twilio/voice",
            params,
            "twilio-auth-token-0123456789abcdef",
        )
        response = await post_twilio(
            client, "/twilio/voice", {**params, "From": "+1999"}, signature=signature
        )
    else:
        response = await post_twilio(client, "/twilio/voice", params, signature=signature)
    assert response.status == 403
    assert await _rows(database, webhook_events) == 0
    assert await _rows(database, calls) == 0


async def test_the_same_request_signed_right_is_accepted(client, database):
    await _account(client)
    response = await post_twilio(client, "/twilio/voice", CallScript(1, START).voice())
    assert response.status == 200
    assert await _rows(database, webhook_events) == 1


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"CallSid=CA\xff\xfe&From=%2B1", "application/x-www-form-urlencoded"),
        (b'{"CallSid": "CA1"}', "application/json"),
        (b"&".join(b"f%d=1" % i for i in range(1001)), "application/x-www-form-urlencoded"),
        (b"x=" + b"a" * 70_000, "application/x-www-form-urlencoded"),
    ],
)
async def test_malformed_bodies_get_4xx_never_5xx(client, database, body, content_type):
    response = await client.post(
        "/twilio/voice",
        data=body,
        headers={"Content-Type": content_type, "X-Twilio-Signature": "x"},
    )
    assert 400 <= response.status < 500
    assert await _rows(database, webhook_events) == 0


async def test_a_conference_event_for_an_unknown_call_is_404_and_stores_nothing(client, database):
    script = CallScript(99, START).join("customer", 0)
    response = await post_twilio(client, "/twilio/conference", script.events[0])
    assert response.status == 404
    assert await _rows(database, webhook_events) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("SequenceNumber", "seven"),
        ("Timestamp", "yesterday"),
        ("Hold", "maybe"),
        ("ConferenceSid", "XX123"),
    ],
)
async def test_a_malformed_conference_field_is_400(client, database, field, value):
    await _account(client)
    script = await _connected_call(client)
    script.join("customer", 0)
    before = await _rows(database, webhook_events)
    response = await post_twilio(client, "/twilio/conference", {**script.events[1], field: value})
    assert response.status == 400
    assert await _rows(database, webhook_events) == before


# --- the event record and the timeline ------------------------------------------------------


async def test_duplicate_and_reordered_events_give_the_same_view(
    aiohttp_client, database, tmp_path, clock
):
    client = await aiohttp_client(build_app(database, tmp_path, clock))
    await _account(client)
    views = []
    for n, order in ((1, "in order"), (2, "shuffled with repeats")):
        script = await _connected_call(client, n)
        script.join("customer", 0).join("agent:alice", 30).hold("customer", 90)
        script.unhold("customer", 150).join("agent:bob", 160).leave("agent:alice", 400)
        script.leave("agent:bob", 420).end(430)
        events = list(script.events)
        if order != "in order":
            events += random.Random(n).sample(events, 4)
            random.Random(n + 1).shuffle(events)
        for params in events + script.status_events:
            assert (
                await post_twilio(
                    client,
                    "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status",
                    params,
                )
            ).status == 204
        view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
        views.append({k: view[k] for k in ("hold_seconds", "agents", "status", "ended_at")})
    assert views[0] == views[1]
    # alice: active 30..90 and 150..400 = 60 + 250 = 310 s -> 6 minutes
    # bob: active 160..420 = 260 s -> 5 minutes; hold: 0..30, 90..150, 420..430 = 100 s
    assert views[0]["agents"]["alice"]["billable_seconds"] == 310
    assert views[0]["agents"]["alice"]["agent_minutes"] == 6
    assert views[0]["agents"]["bob"]["agent_minutes"] == 5
    assert views[0]["hold_seconds"] == 100
    assert views[0]["status"] == "ended"


async def test_the_view_is_live_while_the_call_is_up(client, clock):
    await _account(client)
    script = await _connected_call(client)
    # each callback arrives when it happens (one stamped ahead of our clock would say Twilio's
    # clock runs that far ahead, and open time would be counted that far ahead too)
    script.join("customer", 0)
    await post_twilio(client, "/twilio/conference", script.events[-1])
    clock.now = START + dt.timedelta(seconds=20)
    script.join("agent:alice", 20)
    await post_twilio(client, "/twilio/conference", script.events[-1])
    clock.now = START + dt.timedelta(seconds=200)
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    # alice active from 20 s to now (200 s): 180 s -> 3 minutes; hold 0..20
    assert view["agents"]["alice"]["active_seconds"] == 180
    assert view["agents"]["alice"]["agent_minutes"] == 3
    assert view["hold_seconds"] == 20 and view["status"] == "connected"
    # nothing is charged until the metering tick runs (it does not in this test)
    assert view["charges"] == {
        "bank_minutes": 0,
        "deposit_minor": 0,
        "card_minor": 0,
        "owed_minor": 0,
        "incidents": 0,
        "waived": False,
    }
    assert any("alice" in entry["event"] for entry in view["timeline"])


async def test_an_unlabelled_participant_counts_as_an_agent_under_its_call_sid(client):
    await _account(client)
    script = await _connected_call(client)
    script.join("customer", 0).join("unlabelled", 10).end(70)
    for params in script.events + script.status_events:
        await post_twilio(
            client,
            "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status",
            params,
        )
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    leg = script.leg("unlabelled")
    assert view["agents"][leg]["billable_seconds"] == 60
    assert view["unlabelled_agents"] == [leg]


async def test_a_call_with_no_end_event_is_closed_by_the_sweeper(client, clock):
    await _account(client)
    script = await _connected_call(client)
    script.join("customer", 0).join("agent:alice", 10)
    for params in script.events:
        await post_twilio(client, "/twilio/conference", params)
    ingest = client.app[SERVICES].ingest
    clock.now = START + dt.timedelta(hours=11)
    assert await ingest.close_stale_calls() == 0
    clock.now = START + dt.timedelta(hours=13)
    assert await ingest.close_stale_calls() == 1
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    assert view["status"] == "ended" and view["closed_by_sweeper"] is True
    # closed at the last event it heard (10 s): alice 0 s, hold 10 s
    assert view["hold_seconds"] == 10


# --- research -------------------------------------------------------------------------------


async def test_research_start_and_stop_is_billable_even_on_hold(client, clock):
    await _account(client)
    script = await _connected_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    for params in script.events:
        await post_twilio(client, "/twilio/conference", params)
    clock.now = START + dt.timedelta(seconds=60)  # each callback arrives when it happens
    script.hold("customer", 60)
    await post_twilio(client, "/twilio/conference", script.events[-1])
    body = {"call_sid": script.call_sid, "agent_id": "alice"}
    assert (await (await agents(client, "/agents/research", {**body, "action": "start"})).json())[
        "outcome"
    ] == "started"
    again = await (await agents(client, "/agents/research", {**body, "action": "start"})).json()
    assert again["outcome"] == "already_started"
    clock.now = START + dt.timedelta(seconds=150)
    assert (await agents(client, "/agents/research", {**body, "action": "stop"})).status == 200
    clock.now = START + dt.timedelta(seconds=300)
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    # active 0..60, research 60..150 on hold: billable 150 s -> 3 minutes; hold 60..300 = 240 s
    assert view["agents"]["alice"]["billable_seconds"] == 150
    assert view["agents"]["alice"]["agent_minutes"] == 3
    assert view["hold_seconds"] == 240


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"agent_id": "alice", "action": "start"}, 400, "call_sid"),
        ({"call_sid": "CAnope", "agent_id": "alice", "action": "start"}, 404, "no call"),
        ({"agent_id": "alice", "action": "pause"}, 400, "start or stop"),
        (
            {"agent_id": "alice", "start": "2026-11-20T15:05:00Z", "end": "2026-11-20T15:01:00Z"},
            400,
            "after start",
        ),
        (
            {"agent_id": "alice", "start": "2026-11-20T15:00:00Z", "end": "2026-11-20T17:00:01Z"},
            400,
            "at most",
        ),
        (
            {"agent_id": "alice", "start": "2026-11-20T15:00:00", "end": "2026-11-20T15:01:00Z"},
            400,
            "offset",
        ),
        (
            {"agent_id": "alice", "start": "2026-11-20T14:00:00Z", "end": "2026-11-20T14:01:00Z"},
            400,
            "before the call",
        ),
        ({"agent_id": "alice", "action": "stop"}, 409, "no research in progress"),
        (
            {
                "agent_id": "alice",
                "start": "9999-12-31T23:00:00-14:00",
                "end": "9999-12-31T23:30:00-14:00",
            },
            400,
            "out of range",
        ),
    ],
)
async def test_bad_research_requests_get_a_clear_4xx(client, database, clock, body, status, says):
    await _account(client)
    script = await _connected_call(client)
    clock.now = START + dt.timedelta(hours=3)
    if "call_sid" not in body and says != "call_sid":
        body = {"call_sid": script.call_sid, **body}
    response = await agents(client, "/agents/research", body)
    assert response.status == status
    assert says in (await response.json())["detail"]
    assert await _rows(database, research_marks) == 0


async def test_research_needs_the_agents_token(client):
    await _account(client)
    script = await _connected_call(client)
    body = {"call_sid": script.call_sid, "agent_id": "alice", "action": "start"}
    for headers in ({}, {"Authorization": "Bearer admin-token-0123456789abcdef"}):
        response = await client.post("/agents/research", json=body, headers=headers)
        assert response.status in (401, 403)
    assert AGENTS not in str(response.headers)


# --- review findings: bad input from signed requests, lockout, stale research ---------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("SequenceNumber", "²"),
        ("CallSid", "CA" + "0" * 100),
        ("Timestamp", "Fri, 31 Dec 9999 23:59:59 -1400"),
    ],
)
async def test_odd_but_signed_conference_fields_get_400_not_500(client, database, field, value):
    await _account(client)
    script = await _connected_call(client)
    script.join("customer", 0)
    response = await post_twilio(client, "/twilio/conference", {**script.events[1], field: value})
    assert response.status == 400


@pytest.mark.parametrize(
    "path", ["/twilio/voice", "/twilio/pin", "/twilio/conference", "/twilio/call-status"]
)
async def test_every_twilio_route_refuses_a_forged_request_and_stores_nothing(
    client, database, path
):
    await _account(client)
    params = CallScript(1, START).voice()
    response = await post_twilio(client, path, params, signature="Zm9yZ2VkIHNpZ25hdHVyZQ==")
    assert response.status == 403
    assert await _rows(database, webhook_events) == 0


async def test_no_pin_entered_counts_as_a_try(client):
    await _account(client, caller_ids=[], pin="246810")
    call_sid = sid("CA", 9)
    await post_twilio(client, "/twilio/voice", voice_params(call_sid, "+15550009"))
    params = voice_params(call_sid, "+15550009")  # the <Redirect> after <Gather>: no Digits
    twiml = await (await post_twilio(client, "/twilio/pin?attempt=1", params)).text()
    assert "not recognised" in twiml and "attempt=2" in twiml


async def test_a_number_that_failed_the_pin_five_times_in_an_hour_is_not_asked_again(client):
    await _account(client, caller_ids=[], pin="246810")
    for n in range(5):
        call_sid = sid("CA", 100 + n)
        await post_twilio(client, "/twilio/voice", voice_params(call_sid, "+15550077"))
        for attempt in (1, 2, 3):
            await post_twilio(
                client, f"/twilio/pin?attempt={attempt}", gather_params(call_sid, "0000")
            )
    twiml = await (
        await post_twilio(client, "/twilio/voice", voice_params(sid("CA", 200), "+15550077"))
    ).text()
    assert "<Gather" not in twiml and "<Conference" not in twiml and "<Hangup" in twiml
    other = await (
        await post_twilio(client, "/twilio/voice", voice_params(sid("CA", 201), "+15550078"))
    ).text()
    assert "<Gather" in other  # another number is still asked


async def test_research_left_open_past_the_limit_does_not_block_new_research(client, clock):
    await _account(client)
    script = await _connected_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    for params in script.events:
        await post_twilio(client, "/twilio/conference", params)
    body = {"call_sid": script.call_sid, "agent_id": "alice"}
    await agents(client, "/agents/research", {**body, "action": "start"})
    clock.now = START + dt.timedelta(hours=3)
    again = await (await agents(client, "/agents/research", {**body, "action": "start"})).json()
    assert again["outcome"] == "started"
    assert len(again["research"]) == 2
    assert again["research"][0]["end"] == (START + dt.timedelta(hours=2)).isoformat()


async def test_the_customer_leg_is_known_by_its_call_sid_even_without_a_label(client):
    await _account(client)
    script = await _connected_call(client)
    script.join("customer", 0).join("agent:alice", 10)
    events = [
        {k: v for k, v in e.items() if k != "ParticipantLabel" or v != "customer"}
        for e in script.events
    ]
    for params in events:
        await post_twilio(client, "/twilio/conference", params)
    script.leave("agent:alice", 70)
    await post_twilio(client, "/twilio/conference", script.events[-1])
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    assert view["unlabelled_agents"] == [] and list(view["agents"]) == ["alice"]
