"""Issue 12, the input side: signed but malformed Twilio requests get 400 naming the field and
store nothing, on SQLite and PostgreSQL; events stamped far outside their call are refused; a
client that hangs up mid-body is neither an error nor a 5xx."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from aiohttp import web
from sqlalchemy import func, select
from structlog.testing import capture_logs

from meterd.logs import AccessLogger
from meterd.metrics import METRICS
from meterd.services.errors import InvalidRequest
from meterd.store.schema import accounts, calls, webhook_events
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.twilio_payloads import (
    call_status_params,
    conference_params,
    gather_params,
    rfc2822,
    sid,
    voice_params,
)

from .twilio_app import ManualClock, admin, agents, build_app, post_twilio

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
ABSURD = "Mon, 02 Dec 99999999999999999999 10:00:00 +0000"  # finding 2


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    client = await aiohttp_client(build_app(database, tmp_path, clock))
    response = await admin(
        client,
        "POST",
        "/admin/accounts",
        {
            "account_id": "acme",
            "name": "Acme",
            "plan": "service_agreement",
            "caller_ids": [CUSTOMER_NUMBER],
        },
    )
    assert response.status == 201, await response.text()
    return client


async def _counts(database) -> tuple[int, int]:
    async with database.read() as connection:
        return (
            await connection.scalar(select(func.count()).select_from(calls)),
            await connection.scalar(select(func.count()).select_from(webhook_events)),
        )


async def _connected(client, n=1) -> CallScript:
    script = CallScript(n, START)
    response = await post_twilio(client, "/twilio/voice", script.voice())
    assert f">{script.call_sid}</Conference>" in await response.text()
    return script


async def _assert_refused(client, database, path, params, field) -> None:
    before = await _counts(database)
    response = await post_twilio(client, path, params)
    body = await response.text()
    assert response.status == 400, f"{path} {field}: {response.status} {body}"
    assert (await response.json())["detail"].startswith(f"{field} "), body
    assert await _counts(database) == before, f"{path} {field}: something was stored"


# --- finding 3: sids, exactly -----------------------------------------------------------------


async def test_a_call_sid_with_a_trailing_newline_is_refused_and_not_stored(client, database):
    call_sid = sid("CA", 0) + "\n"
    await _assert_refused(
        client, database, "/twilio/voice", voice_params(call_sid, CUSTOMER_NUMBER), "CallSid"
    )
    async with database.read() as connection:
        assert await connection.scalar(select(func.count()).select_from(calls)) == 0


async def test_every_route_refuses_a_malformed_field_and_stores_nothing(client, database):
    script = await _connected(client)
    script.join("customer", 0).join("agent:alice", 10)
    join = script.events[2]
    call_sid = script.call_sid
    cases = [
        ("/twilio/voice", voice_params(sid("CA", 5) + "\n", CUSTOMER_NUMBER), "CallSid"),
        ("/twilio/voice", voice_params(sid("CA", 5), CUSTOMER_NUMBER + "\n"), "From"),
        ("/twilio/voice", voice_params(sid("CA", 5), "\x00"), "From"),
        ("/twilio/voice", voice_params(sid("CA", 5), CUSTOMER_NUMBER, To="x"), "To"),
        (
            "/twilio/voice",
            voice_params(sid("CA", 5), CUSTOMER_NUMBER, AccountSid=sid("AC", 1) + "\n"),
            "AccountSid",
        ),
        ("/twilio/pin?attempt=1", gather_params(call_sid + "\n", "1234"), "CallSid"),
        ("/twilio/pin?attempt=1", gather_params(call_sid, "\u0661\u0662\u0663\u0664"), "Digits"),
        ("/twilio/pay?attempt=1", voice_params(call_sid, CUSTOMER_NUMBER, Result="x"), "Result"),
        ("/twilio/pay-status", voice_params(call_sid + "\n", CUSTOMER_NUMBER), "CallSid"),
        ("/twilio/fallback", voice_params("CA", CUSTOMER_NUMBER), "CallSid"),
        (
            "/twilio/conference",
            {**join, "ConferenceSid": script.conference_sid + "\n"},
            "ConferenceSid",
        ),
        ("/twilio/conference", {**join, "FriendlyName": call_sid + "\n"}, "FriendlyName"),
        ("/twilio/conference", {**join, "CallSid": script.leg("agent:alice") + "\n"}, "CallSid"),
        ("/twilio/conference", {**join, "CallSidToCoach": "CA\n"}, "CallSidToCoach"),
        (
            "/twilio/conference",
            {**join, "StatusCallbackEvent": "participant-jump"},
            "StatusCallbackEvent",
        ),
        ("/twilio/conference", {**join, "SequenceNumber": "2\n"}, "SequenceNumber"),
        ("/twilio/conference", {**join, "SequenceNumber": "1" * 13}, "SequenceNumber"),
        ("/twilio/conference", {**join, "Timestamp": ABSURD}, "Timestamp"),
        ("/twilio/conference", {**join, "Hold": "true\n"}, "Hold"),
        ("/twilio/conference", {**join, "Muted": "1"}, "Muted"),
        ("/twilio/conference", {**join, "ParticipantLabel": "agent:al\x00ice"}, "ParticipantLabel"),
        (
            "/twilio/call-status",
            call_status_params(call_sid + "\n", "completed", 0, START),
            "CallSid",
        ),
        (
            "/twilio/call-status",
            call_status_params(call_sid, "completed", 0, START, CallStatus="completed\n"),
            "CallStatus",
        ),
        (
            "/twilio/call-status",
            call_status_params(call_sid, "completed", 0, START, Timestamp=ABSURD),
            "Timestamp",
        ),
        (
            "/twilio/call-status",
            call_status_params(call_sid, "completed", 0, START, CallbackSource="a\nb"),
            "CallbackSource",
        ),
    ]
    for path, params, field in cases:
        await _assert_refused(client, database, path, params, field)
    # and the well-formed originals are still accepted
    for params in script.events:
        assert (await post_twilio(client, "/twilio/conference", params)).status == 204


# --- finding 2: absurd timestamps -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/twilio/conference", "/twilio/call-status"])
async def test_an_absurd_but_signed_timestamp_is_400_not_500(client, database, path):
    script = await _connected(client)
    script.join("customer", 0).end(60)
    params = script.events[1] if path == "/twilio/conference" else script.status_events[0]
    await _assert_refused(client, database, path, {**params, "Timestamp": ABSURD}, "Timestamp")


# --- finding 0: a Timestamp far outside the call ----------------------------------------------


def _join(script: CallScript, at: dt.datetime, sequence: int = 1) -> dict[str, str]:
    return conference_params(
        script.conference_sid,
        script.call_sid,
        "participant-join",
        sequence,
        at,
        call_sid=script.leg("agent:alice"),
        label="agent:alice",
    )


@pytest.mark.parametrize(
    "at",
    [
        START - dt.timedelta(days=1, seconds=1),  # just past the default skew (a day)
        START - dt.timedelta(days=400),
        dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        START + dt.timedelta(days=1, seconds=1),  # ahead of meterd's clock by more than a day
        dt.datetime(2999, 12, 31, tzinfo=dt.UTC),
    ],
    ids=["day-and-a-second-before", "400-days-before", "year-2000", "day-ahead", "year-2999"],
)
async def test_a_join_stamped_far_outside_the_call_is_refused_and_stores_nothing(
    client, database, at
):
    script = await _connected(client)
    await _assert_refused(client, database, "/twilio/conference", _join(script, at), "Timestamp")
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    assert view["agents"] == {}
    async with database.read() as connection:
        assert await connection.scalar(select(calls.c.conference_sid)) is None


async def test_the_1971_join_of_the_issue_is_refused_and_the_call_stays_sane(client, database):
    script = await _connected(client)
    old = "Fri, 01 Jan 1971 00:00:00 +0000"
    customer = conference_params(
        script.conference_sid,
        script.call_sid,
        "participant-join",
        0,
        START,
        call_sid=script.call_sid,
        label="customer",
        Timestamp=old,
    )
    await _assert_refused(client, database, "/twilio/conference", customer, "Timestamp")
    await _assert_refused(
        client,
        database,
        "/twilio/conference",
        {**_join(script, START), "Timestamp": old},
        "Timestamp",
    )


@pytest.mark.parametrize(
    "at",
    [START - dt.timedelta(days=1), START + dt.timedelta(hours=23)],
    ids=["a-day-before", "hours-ahead"],
)
async def test_a_join_within_the_bounds_is_accepted(client, database, at):
    script = await _connected(client)
    response = await post_twilio(client, "/twilio/conference", _join(script, at))
    assert response.status == 204, await response.text()
    assert (await _counts(database))[1] == 2  # voice + join


async def test_a_hang_up_stamped_before_the_call_does_not_end_it(client, database):
    script = await _connected(client)
    params = call_status_params(script.call_sid, "completed", 0, START - dt.timedelta(days=2))
    await _assert_refused(client, database, "/twilio/call-status", params, "Timestamp")
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    assert view["status"] == "connected" and view["ended_at"] is None


async def test_the_skew_is_a_setting(aiohttp_client, database, tmp_path, clock):
    client = await aiohttp_client(
        build_app(database, tmp_path, clock, METERD_TWILIO_CLOCK_SKEW_SECONDS_MAX="7200")
    )
    call_sid = sid("CA", 77)
    await post_twilio(client, "/twilio/voice", voice_params(call_sid, "+15550077"))
    script = CallScript(77, START)
    assert (
        await post_twilio(
            client, "/twilio/conference", _join(script, START - dt.timedelta(hours=1))
        )
    ).status == 204
    refused = await post_twilio(
        client, "/twilio/conference", _join(script, START - dt.timedelta(hours=3), sequence=2)
    )
    assert refused.status == 400
    assert "twilio_clock_skew_seconds_max (7200 s)" in (await refused.json())["detail"]


async def test_the_ingest_service_is_strict_on_its_own(client):
    """The service checks what it reads even when called without the web edge's checks."""
    script = await _connected(client)
    ingest = client.app[SERVICES].ingest
    join = _join(script, START)
    for field, value in [
        ("FriendlyName", script.call_sid + "\n"),
        ("ConferenceSid", script.conference_sid + "\n"),
        ("CallSid", script.leg("agent:alice") + "\n"),
        ("Timestamp", ABSURD),
        ("Timestamp", rfc2822(START - dt.timedelta(days=2))),
    ]:
        form = {**join, field: value}
        with pytest.raises(InvalidRequest) as refused:
            await ingest.conference_event(form, list(form.items()))
        assert field in refused.value.detail
    status = call_status_params(script.call_sid + "\n", "completed", 0, START)
    with pytest.raises(InvalidRequest, match=r"^CallSid "):
        await ingest.call_status(status, list(status.items()))


# --- JSON inputs: no trailing newline through a "$" either ------------------------------------


async def test_admin_and_agent_fields_with_a_trailing_newline_are_refused(client, database):
    base = {"name": "Beta", "plan": "service_agreement"}
    for body in (
        {**base, "account_id": "beta\n"},
        {**base, "account_id": "beta", "caller_ids": ["+14155550100\n"]},
        {**base, "account_id": "beta", "pin": "135790\n"},
        {**base, "account_id": "beta", "currency": "EUR\n"},
    ):
        response = await admin(client, "POST", "/admin/accounts", body)
        assert response.status == 400, (body, await response.text())
    async with database.read() as connection:
        assert await connection.scalar(select(func.count()).select_from(accounts)) == 1
    deposit = await admin(
        client, "POST", "/admin/accounts/acme/deposits", {"amount_minor": 100, "reference": "r\n"}
    )
    assert deposit.status == 400
    script = await _connected(client)
    research = await agents(
        client,
        "/agents/research",
        {"call_sid": script.call_sid, "agent_id": "alice\n", "action": "start"},
    )
    assert research.status == 400


# --- finding 6: a client that hangs up mid-body -----------------------------------------------


async def test_a_client_hanging_up_mid_body_is_not_an_error_nor_a_5xx(database, tmp_path, clock):
    # served as `meterd run` serves it (aiohttp's test server cancels the handler instead)
    app = build_app(database, tmp_path, clock)
    runner = web.AppRunner(app, access_log_class=AccessLogger, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    metrics = app[METRICS]
    route = "/twilio/conference"

    def count(status: str) -> float | None:
        return metrics.registry.get_sample_value(
            "meterd_webhooks_total", {"route": route, "status": status}
        )

    try:
        with capture_logs() as logs:
            _, writer = await asyncio.open_connection(host, port)
            writer.write(
                b"POST /twilio/conference HTTP/1.1\r\nHost: calls.example.com\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"X-Twilio-Signature: c2lnbmF0dXJl\r\nContent-Length: 1000\r\n\r\nCallSid=CA"
            )
            await writer.drain()
            await asyncio.sleep(0.1)  # the handler is now waiting for the rest of the body
            writer.close()
            await writer.wait_closed()
            for _ in range(100):
                if any(count(status) for status in ("499", "500", "cancelled")):
                    break  # the request was answered
                await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
    assert count("500") is None
    assert count("499") == 1
    assert [e for e in logs if e["log_level"] in ("warning", "error", "critical")] == []
    assert not any("exc_info" in e or "exception" in e for e in logs)
    quiet = [e for e in logs if e["event"].startswith("client closed the connection")]
    assert len(quiet) == 1 and quiet[0]["log_level"] == "debug"
