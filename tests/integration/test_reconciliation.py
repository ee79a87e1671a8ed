"""The nightly check against Twilio's call records (issue 17, acceptance 4), in-process on both
backends against the local recording server, which answers the Calls list in Twilio's pages: a
call missing in meterd, one missing at Twilio and one of another length, across three pages,
each reported once, in JSON and in CSV; the agents' legs and Twilio's child legs are not
callers."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from sqlalchemy import text

from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.recording_server import RecordingTwilio, listed_call
from tests.twilio_payloads import SUPPORT_NUMBER, call_status_params, voice_params

from .twilio_app import ManualClock, admin, agents, build_app, post_twilio, recorded_rest

FINANCE = "finance-token-0123456789abcdef"
DAY = dt.date(2026, 11, 20)


def at(hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, 20, hour, minute, tzinfo=dt.UTC)


@pytest.fixture
async def twilio():
    async with RecordingTwilio() as server:
        yield server


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, twilio):
    rest = recorded_rest(twilio)
    clock = ManualClock(at(9))
    app = build_app(database, tmp_path, clock, twilio_rest=rest, METERD_FINANCE_TOKEN=FINANCE)
    client = await aiohttp_client(app)
    client.clock = clock
    yield client
    await rest.close()


async def _call(client, n: int, start: dt.datetime, seconds: int) -> CallScript:
    """A call meterd recorded: rung at `start`, answered by alice, over `seconds` later."""
    client.clock.now = start
    script = CallScript(n, start)
    await post_twilio(client, "/twilio/voice", script.voice())
    script.join("customer", 0).join("agent:alice", 0).end(seconds)
    for params in script.events + script.status_events:
        path = "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status"
        assert (await post_twilio(client, path, params)).status == 204
    return script


async def _finance(client, path: str):
    return await client.get(path, headers={"Authorization": f"Bearer {FINANCE}"})


async def test_each_finding_is_reported_once_across_three_pages(client, twilio):
    same = await _call(client, 1, at(9), 120)
    longer = await _call(client, 2, at(10), 120)  # Twilio says 150 s
    only_ours = await _call(client, 3, at(11), 60)
    agent_leg = same.leg("agent:alice")  # alice's leg: inbound, but an agent's
    twilio.listed_calls = [
        listed_call(same.call_sid, at(9), 120),
        listed_call(longer.call_sid, at(10), 150),
        listed_call("CA" + "9" * 32, at(12), 300),  # never reached meterd
        listed_call(agent_leg, at(9), 120),
        listed_call("CA" + "8" * 32, at(13), 60, direction="outbound-dial",
                    parent_call_sid=same.call_sid),
        listed_call("CA" + "7" * 32, at(23, 59) + dt.timedelta(days=1), 60),  # another day
    ]  # fmt: skip
    twilio.list_page_size = 2
    client.clock.now = dt.datetime(2026, 11, 21, 0, 40, tzinfo=dt.UTC)
    report = await client.app[SERVICES].reconciliation.run(DAY)

    assert [c["call_sid"] for c in report["missing_in_meterd"]] == ["CA" + "9" * 32]
    assert [c["call_sid"] for c in report["missing_at_twilio"]] == [only_ours.call_sid]
    assert report["duration_differs"] == [
        {"call_sid": longer.call_sid, "twilio_seconds": 150, "meterd_seconds": 120}
    ]
    assert report["matched"] == 2 and report["clean"] is False
    pages = [r for r in twilio.requests if r.path.endswith("/Calls.json")]
    assert len(pages) == 3  # 5 calls of the asked dates, 2 to a page
    # the day with a margin of 10 minutes, and a date more at the end
    assert dict(pages[0].query)["StartTime>"] == "2026-11-19"
    assert dict(pages[0].query)["StartTime<"] == "2026-11-22"

    response = await _finance(client, "/finance/reconciliation/2026-11-20.json")
    assert response.status == 200 and await response.json() == report
    response = await _finance(client, "/finance/reconciliation/2026-11-20.csv")
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [(r["finding"], r["call_sid"]) for r in rows] == [
        ("missing_in_meterd", "CA" + "9" * 32),
        ("missing_at_twilio", only_ours.call_sid),
        ("duration_differs", longer.call_sid),
    ]
    assert rows[2]["twilio_seconds"] == "150" and rows[2]["meterd_seconds"] == "120"

    again = await client.app[SERVICES].reconciliation.run(DAY)  # a second run: the same report
    assert again == report


async def test_a_day_not_reconciled_or_not_closed_is_a_clear_404(client):
    client.clock.now = dt.datetime(2026, 11, 21, 0, 40, tzinfo=dt.UTC)
    response = await _finance(client, "/finance/reconciliation/2026-11-20.json")
    assert response.status == 404
    assert (await response.json())["error"] == "reconciliation_not_ready"
    assert (await _finance(client, "/finance/reconciliation/2026-13-01.json")).status == 400


async def test_with_no_twilio_account_it_says_it_is_off(aiohttp_client, database, tmp_path):
    app = build_app(database, tmp_path, ManualClock(at(9)), METERD_FINANCE_TOKEN=FINANCE)
    client = await aiohttp_client(app)
    assert not client.app[SERVICES].reconciliation.enabled
    assert await client.app[SERVICES].reconciliation.nightly() == []
    response = await _finance(client, "/finance/reconciliation/2026-11-19.json")
    assert response.status == 404 and (await response.json())["error"] == "reconciliation_off"


async def test_callbacks_are_compared_from_their_answer_and_rest_placed_legs_are_not(
    aiohttp_client, database, tmp_path, twilio
):
    """Issue 17: a callback meterd placed is Twilio's `outbound-api` call, compared by its
    length from the answer (it rang for 20 s first); one that rang out has no length; an
    agent's leg the desk placed through the REST API is not meterd's to have."""
    rest = recorded_rest(twilio)
    clock = ManualClock(at(9))
    app = build_app(
        database,
        tmp_path,
        clock,
        twilio_rest=rest,
        METERD_FINANCE_TOKEN=FINANCE,
        METERD_CALLBACK_FROM_NUMBER=SUPPORT_NUMBER,
    )
    client = await aiohttp_client(app)
    body = {
        "account_id": "acme",
        "name": "Acme",
        "plan": "service_agreement",
        "caller_ids": [CUSTOMER_NUMBER],
        "products": [],
    }
    assert (await admin(client, "POST", "/admin/accounts", body)).status == 201
    placed = []
    for reference in ("answered", "rang-out"):
        asked = {"client_reference": reference, "account_id": "acme", "agent_id": "alice"}
        response = await agents(client, "/agents/callbacks", asked | {"to": CUSTOMER_NUMBER})
        assert response.status == 201, await response.text()
        placed.append((await response.json())["call_sid"])
    answered, rang_out = placed
    clock.now = at(9, 1) - dt.timedelta(seconds=40)  # it rang for 20 s
    script = CallScript(1, clock.now, given_call_sid=answered)
    form = voice_params(
        answered,
        SUPPORT_NUMBER,
        CUSTOMER_NUMBER,
        Direction="outbound-api",
        CallStatus="in-progress",
    )
    path = f"/twilio/callback?callback={(await _callbacks(client))['answered']}"
    assert "<Conference" in await (await post_twilio(client, path, form)).text()
    script.join("customer", 0).join("agent:alice", 0).end(300)
    ended = call_status_params(rang_out, "no-answer", 0, at(9, 1), Direction="outbound-api")
    for params in [*script.events, *script.status_events, ended]:
        route = "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status"
        assert (await post_twilio(client, route, params)).status == 204
    twilio.listed_calls = [
        listed_call(answered, script.base, 300, direction="outbound-api"),
        listed_call(rang_out, at(9), 0, direction="outbound-api", status="no-answer"),
        listed_call("CA" + "6" * 32, at(9), 300, direction="outbound-api"),  # an agent's leg
    ]
    clock.now = dt.datetime(2026, 11, 21, 0, 40, tzinfo=dt.UTC)
    report = await client.app[SERVICES].reconciliation.run(DAY)
    assert report["clean"] is True and report["matched"] == 2, report
    await rest.close()


async def _callbacks(client) -> dict[str, str]:
    """The callbacks' ids by client reference, read back from the database."""
    async with client.app[SERVICES].database.read() as connection:
        rows = await connection.execute(text("SELECT client_reference, callback_id FROM callbacks"))
        return {row[0]: row[1] for row in rows}
