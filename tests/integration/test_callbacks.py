"""Callbacks (issue 17): the desk rings a customer back through `POST /agents/callbacks`, and the
call is metered like an incoming one. Twilio's REST API is the recording server; the customer's
answer and the conference are Twilio's webhooks, signed, on both backends."""

from __future__ import annotations

import asyncio
import datetime as dt
import re

import pytest

from meterd.adapters.stripe_gateway import StripeGateway, StripeSettings
from meterd.services.ledger_check import check_ledger
from meterd.store import ledger_store
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.recording_server import RecordingTwilio
from tests.stripe_server import SECRET_KEY
from tests.twilio_payloads import ACCOUNT_SID, SUPPORT_NUMBER, call_status_params, voice_params

from .helpers import use_minutes
from .test_exhaustion import outbox_created, tick_until
from .test_metering import START, account, balances, deliver
from .test_payments import intents
from .twilio_app import (
    AGENTS,
    PUBLIC_BASE_URL,
    ManualClock,
    admin,
    agents,
    build_app,
    post_twilio,
    recorded_rest,
)

CALLS_CREATE = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"


@pytest.fixture
async def twilio():
    async with RecordingTwilio() as server:
        yield server


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, twilio):
    rest = recorded_rest(twilio)
    clock = ManualClock(START)
    app = build_app(
        database,
        tmp_path,
        clock,
        twilio_rest=rest,
        METERD_CALLBACK_FROM_NUMBER=SUPPORT_NUMBER,
        METERD_SETTLE_DELAY_SECONDS="60",
        METERD_WARN_MINUTES_LEFT="2",
        METERD_GRACE_SECONDS="60",
    )
    client = await aiohttp_client(app)
    client.clock = clock
    yield client
    await rest.close()


def _asked(reference: str = "crm-4711", **fields: str) -> dict[str, str]:
    return {
        "client_reference": reference,
        "account_id": "acme",
        "agent_id": "alice",
        "to": CUSTOMER_NUMBER,
        **fields,
    }


async def _grant(client, minutes: int) -> None:
    body = {"minutes": minutes, "reference": f"grant-{minutes}"}
    assert (await admin(client, "POST", "/admin/accounts/acme/minutes", body)).status == 201


async def _answer(client, callback: dict) -> str:
    """The customer picks up: Twilio asks the URL meterd gave it for the call's TwiML."""
    path = f"/twilio/callback?callback={callback['callback_id']}"
    params = voice_params(
        callback["call_sid"],
        SUPPORT_NUMBER,
        CUSTOMER_NUMBER,
        Direction="outbound-api",
        CallStatus="in-progress",
    )
    response = await post_twilio(client, path, params)
    assert response.status == 200
    return await response.text()


async def _callback_view(client, callback_id: str) -> dict:
    response = await client.get(
        f"/agents/callbacks/{callback_id}", headers={"Authorization": f"Bearer {AGENTS}"}
    )
    assert response.status == 200
    return await response.json()


async def test_a_callback_with_3_banked_minutes_is_metered_announced_hung_up_and_settled(
    client, twilio, database
):
    await account(client, products=[])
    await _grant(client, 3)
    response = await agents(client, "/agents/callbacks", _asked())
    assert response.status == 201, await response.text()
    callback = await response.json()
    [(call_sid, form)] = twilio.created_calls
    assert callback["status"] == "placed" and callback["call_sid"] == call_sid
    assert callback["conference"] == call_sid and callback["participant_label"] == "agent:alice"
    assert callback["outcome"] == "ringing"
    # the call Twilio was asked to place: the customer, from the desk's number, answered by
    # meterd's callback URL, with the call-status callback incoming calls have
    assert form["To"] == CUSTOMER_NUMBER and form["From"] == SUPPORT_NUMBER
    assert form["Url"] == f"{PUBLIC_BASE_URL}/twilio/callback?callback={callback['callback_id']}"
    assert form["Method"] == "POST"
    assert form["StatusCallback"] == f"{PUBLIC_BASE_URL}/twilio/call-status"
    assert form["StatusCallbackEvent"] == "completed"

    twiml = await _answer(client, callback)
    assert re.search(rf'participantLabel="customer"[^>]*>{call_sid}</Conference>', twiml), twiml
    assert f'statusCallback="{PUBLIC_BASE_URL}/twilio/conference"' in twiml
    assert (await _callback_view(client, callback["callback_id"]))["outcome"] == "connected"

    script = CallScript(1, START, given_call_sid=call_sid)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await tick_until(client, 200)
    # as an incoming call: minute 1 at 0 s leaves 2 (the warning), minute 3 at 120 s leaves
    # none (the announcement), grace_seconds later the call is ended
    assert await outbox_created(database) == {"warn": 1, "exhausted": 120, "hang_up": 180}
    paths = [r.path for r in twilio.requests]
    conference = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Conferences/{script.conference_sid}.json"
    hang_up = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{call_sid}.json"
    assert paths == [CALLS_CREATE, conference, conference, hang_up]

    script.leave("agent:alice", 185).end(185)
    await deliver(client, script.events[3:] + script.status_events)
    client.clock.now = START + dt.timedelta(seconds=300)
    await client.app[SERVICES].metering.tick()
    view = await (await admin(client, "GET", f"/admin/calls/{call_sid}")).json()
    assert view["direction"] == "outbound" and view["settled_at"] is not None
    assert view["charges"]["bank_minutes"] == 3 and view["charges"]["owed_minor"] == 100
    assert await balances(client) == (0, 0)
    assert (await _callback_view(client, callback["callback_id"]))["outcome"] == "completed"
    assert (await check_ledger(database)).ok


async def test_no_funds_is_409_with_the_reason_and_no_call_is_created(client, twilio):
    await account(client, products=[])
    response = await agents(client, "/agents/callbacks", _asked())
    assert response.status == 409
    body = await response.json()
    assert body["error"] == "no_funds"
    assert "0 banked minutes, 0 in the deposit" in body["detail"], body
    assert twilio.created_calls == []
    # the refusal did not use the reference up: once funded, the same request places the call
    await _grant(client, 1)
    assert (await agents(client, "/agents/callbacks", _asked())).status == 201
    assert len(twilio.created_calls) == 1


@pytest.mark.parametrize("status", ["busy", "no-answer", "failed", "canceled"])
async def test_a_callback_not_answered_charges_nothing_and_says_why(
    client, twilio, database, status
):
    await account(client, products=[])
    await _grant(client, 3)
    callback = await (await agents(client, "/agents/callbacks", _asked())).json()
    ended = call_status_params(
        callback["call_sid"], status, 0, START + dt.timedelta(seconds=25), Direction="outbound-api"
    )
    await deliver(client, [ended])
    await tick_until(client, 200)  # past the settlement delay
    assert (await _callback_view(client, callback["callback_id"]))["outcome"] == status
    view = await (await admin(client, "GET", f"/admin/calls/{callback['call_sid']}")).json()
    assert view["direction"] == "outbound" and view["status"] == "rejected"
    assert view["end_reason"] == f"call-{status}"
    assert await balances(client) == (3, 0)
    assert (await check_ledger(database)).ok


async def test_the_same_client_reference_twice_creates_one_call(client, twilio):
    await account(client, products=[])
    await _grant(client, 3)
    first = await agents(client, "/agents/callbacks", _asked())
    again = await agents(client, "/agents/callbacks", _asked())
    assert (first.status, again.status) == (201, 200)
    assert (await first.json()) == (await again.json())
    # two at once (two clicks, two desks): one call
    both = await asyncio.gather(
        agents(client, "/agents/callbacks", _asked("crm-4712")),
        agents(client, "/agents/callbacks", _asked("crm-4712")),
    )
    assert sorted(r.status for r in both) == [200, 201]
    assert len(twilio.created_calls) == 2
    # the same reference for another request is a conflict, and rings nobody
    other = await agents(client, "/agents/callbacks", _asked(to="+14155550143"))
    assert other.status == 409 and (await other.json())["error"] == "conflict"
    assert len(twilio.created_calls) == 2


@pytest.mark.parametrize("twilio_status", [400, 500])
async def test_twilio_refusing_is_502_asked_once_and_the_reference_remembers_it(
    client, twilio, twilio_status
):
    await account(client, products=[])
    await _grant(client, 3)
    twilio.fail_next(1, status=twilio_status)
    response = await agents(client, "/agents/callbacks", _asked())
    assert response.status == 502
    body = await response.json()
    assert body["error"] == "twilio_failed" and body["callback"]["status"] == "not_placed"
    assert len(twilio.requests) == 1  # never retried: a retry could ring the customer twice
    again = await (await agents(client, "/agents/callbacks", _asked())).json()
    assert again["status"] == "not_placed" and again["outcome"] == "not_placed"
    assert len(twilio.requests) == 1


async def test_funds_gone_by_the_answer_hang_up_without_connecting(client, twilio, database):
    await account(client, products=[])
    await _grant(client, 1)
    callback = await (await agents(client, "/agents/callbacks", _asked())).json()
    # another call takes the last minute while the customer's phone rings
    async with database.write() as connection:
        await ledger_store.post(connection, use_minutes("acme", 1, "used-elsewhere"), START)
    twiml = await _answer(client, callback)
    assert "<Conference" not in twiml and "<Hangup" in twiml
    assert (await _callback_view(client, callback["callback_id"]))["outcome"] == "no_funds"
    assert (await check_ledger(database)).ok


async def test_bad_answers_and_requests_are_refused_clearly(client, twilio):
    await account(client, products=[])
    await _grant(client, 3)
    callback = await (await agents(client, "/agents/callbacks", _asked())).json()
    first = await _answer(client, callback)
    assert await _answer(client, callback) == first  # Twilio's retry: the same answer
    unknown = await post_twilio(
        client,
        "/twilio/callback?callback=cb_" + "0" * 24,
        voice_params(callback["call_sid"], SUPPORT_NUMBER),
    )
    assert unknown.status == 404
    other_sid = "CA" + "f" * 32
    other = await post_twilio(
        client,
        f"/twilio/callback?callback={callback['callback_id']}",
        voice_params(other_sid, SUPPORT_NUMBER),
    )
    assert other.status == 400
    for body in (
        {},
        _asked(to="555"),
        _asked(caller_number=CUSTOMER_NUMBER),  # both account_id and caller_number
        {**_asked("crm-new"), "account_id": "nobody"},
    ):
        response = await agents(client, "/agents/callbacks", body)
        assert response.status in (400, 404), (body, response.status)
    assert len(twilio.created_calls) == 1


async def test_a_caller_number_names_the_account(client, twilio):
    await account(client, products=[])
    await _grant(client, 3)
    asked = {"client_reference": "r1", "caller_number": CUSTOMER_NUMBER, "agent_id": "bob"}
    response = await agents(client, "/agents/callbacks", asked)
    assert response.status == 201
    assert (await response.json())["account_id"] == "acme"
    assert twilio.created_calls[0][1]["To"] == CUSTOMER_NUMBER


async def test_callbacks_are_off_without_a_from_number(aiohttp_client, database, tmp_path):
    async with RecordingTwilio() as twilio:
        rest = recorded_rest(twilio)
        client = await aiohttp_client(
            build_app(database, tmp_path, ManualClock(START), twilio_rest=rest)
        )
        await account(client, products=[])
        response = await agents(client, "/agents/callbacks", _asked())
        assert response.status == 503 and (await response.json())["error"] == "callbacks_off"
        assert twilio.requests == []
        await rest.close()


@pytest.fixture
async def card_client(aiohttp_client, database, tmp_path, twilio, localstripe):
    """The app with both Twilio's REST API (the recording server) and cards (localstripe)."""
    localstripe.reset()
    rest = recorded_rest(twilio)
    gateway = StripeGateway(
        StripeSettings(secret_key=SECRET_KEY, api_base_url=localstripe.base_url)
    )
    clock = ManualClock(START)
    app = build_app(
        database,
        tmp_path,
        clock,
        twilio_rest=rest,
        gateway=gateway,
        METERD_CALLBACK_FROM_NUMBER=SUPPORT_NUMBER,
        METERD_SETTLE_DELAY_SECONDS="60",
    )
    client = await aiohttp_client(app)
    client.clock = clock
    yield client
    await rest.close()
    await gateway.close()


@pytest.mark.parametrize(
    ("card", "connected", "bank_minutes"),
    [("pm_card_visa", True, 30), ("pm_card_chargeCustomerFail", False, 0)],
)
async def test_a_card_on_file_funds_a_callback_charged_once_when_answered(
    card_client, localstripe, database, card, connected, bank_minutes
):
    """No bank, no deposit, a card on file: the callback is placed, and the card is charged
    for a block when the customer answers (never before, at most once); a declined card means
    the customer is told and not connected, nothing kept. No <Pay> on an outbound leg."""
    client = card_client
    await account(client, products=[])
    assert (await client.app[SERVICES].payments.save_card("acme", card)).ok
    response = await agents(client, "/agents/callbacks", _asked())
    assert response.status == 201, await response.text()
    callback = await response.json()
    assert await intents(localstripe, callback["call_sid"]) == []  # not charged before answering
    twiml = await _answer(client, callback)
    assert "<Pay" not in twiml and ("<Conference" in twiml) is connected, twiml
    assert await _answer(client, callback) == twiml  # Twilio's retry charges nothing more
    succeeded = [
        i for i in await intents(localstripe, callback["call_sid"]) if i.status == "succeeded"
    ]
    assert len(succeeded) == (1 if connected else 0)
    assert await balances(client) == (bank_minutes, 0)
    outcome = (await _callback_view(client, callback["callback_id"]))["outcome"]
    assert outcome == ("connected" if connected else "no_funds")
    assert (await check_ledger(database)).ok


async def test_a_waived_callback_leaves_the_account_as_before(client, twilio, database):
    await account(client, products=[])
    await _grant(client, 3)
    callback = await (await agents(client, "/agents/callbacks", _asked())).json()
    await _answer(client, callback)
    script = CallScript(1, START, given_call_sid=callback["call_sid"])
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await tick_until(client, 70)
    assert await balances(client) == (1, 0)  # minutes 1 and 2 taken live
    waiver = {"call_sid": callback["call_sid"], "agent_id": "alice", "reason": "goodwill"}
    response = await agents(client, "/agents/waiver", waiver)
    assert response.status == 200, await response.text()
    script.leave("agent:alice", 90).end(90)
    await deliver(client, script.events[3:] + script.status_events)
    await tick_until(client, 300)
    view = await (await admin(client, "GET", f"/admin/calls/{callback['call_sid']}")).json()
    assert view["settled_at"] is not None and view["direction"] == "outbound"
    assert await balances(client) == (3, 0)
    assert (await check_ledger(database)).ok
