"""The Twilio REST adapter against a local recording server standing in for api.twilio.com."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from meterd.adapters.twilio_rest import TwilioRest, TwilioRestError, TwilioRestSettings
from tests.recording_server import RecordingTwilio

ACCOUNT_SID = "AC" + "a1" * 16
AUTH_TOKEN = "auth-token-never-logged-0123456789"
CALL_SID = "CA" + "c2" * 16
CONFERENCE_SID = "CF" + "f3" * 16
ANNOUNCE_URL = "https://meterd.example/twiml/announce?minutes=5"
CALL_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"
CONFERENCE_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Conferences/{CONFERENCE_SID}.json"


def _settings(server: Any, **overrides: Any) -> TwilioRestSettings:
    values: dict[str, Any] = {
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "api_base_url": server.base_url,
        "timeout_seconds": 2.0,
        "attempts_max": 3,
        "retry_backoff_seconds": 0.001,
    }
    return TwilioRestSettings(**(values | overrides))


@pytest.fixture
async def twilio() -> AsyncIterator[RecordingTwilio]:
    async with RecordingTwilio() as server:
        yield server


@pytest.fixture
async def rest(twilio: RecordingTwilio) -> AsyncIterator[TwilioRest]:
    adapter = TwilioRest(_settings(twilio))
    yield adapter
    await adapter.close()


async def test_hang_up_posts_status_completed_to_the_call(twilio, rest):
    await rest.hang_up(CALL_SID)

    [request] = twilio.requests
    assert (request.method, request.path) == ("POST", CALL_PATH)
    assert request.form == [("Status", "completed")]
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_announce_posts_announce_url_and_post_method_to_the_conference(twilio, rest):
    await rest.announce_to_conference(CONFERENCE_SID, ANNOUNCE_URL)

    [request] = twilio.requests
    assert (request.method, request.path) == ("POST", CONFERENCE_PATH)
    assert request.form_dict == {"AnnounceUrl": ANNOUNCE_URL, "AnnounceMethod": "POST"}


async def test_requests_carry_basic_auth_of_account_sid_and_auth_token(twilio, rest):
    await rest.hang_up(CALL_SID)
    await rest.announce_to_conference(CONFERENCE_SID, ANNOUNCE_URL)

    assert [r.basic_auth for r in twilio.requests] == [(ACCOUNT_SID, AUTH_TOKEN)] * 2


async def test_twilio_edge_and_region_in_the_environment_do_not_redirect_requests(
    twilio, monkeypatch
):
    # twilio-python reads these and would otherwise rewrite the host of api_base_url.
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_REGION", "au1")
    adapter = TwilioRest(_settings(twilio))
    try:
        await adapter.hang_up(CALL_SID)
    finally:
        await adapter.close()

    assert [r.path for r in twilio.requests] == [CALL_PATH]


async def test_api_base_url_with_a_trailing_slash_still_reaches_the_right_path(twilio):
    adapter = TwilioRest(_settings(twilio, api_base_url=twilio.base_url + "/"))
    try:
        await adapter.hang_up(CALL_SID)
    finally:
        await adapter.close()

    assert [r.path for r in twilio.requests] == [CALL_PATH]


async def test_two_500s_then_success_takes_three_requests(twilio, rest):
    twilio.fail_next(2, status=500)

    await rest.hang_up(CALL_SID)

    assert [r.path for r in twilio.requests] == [CALL_PATH] * 3


@pytest.mark.parametrize("attempts_max", [1, 3, 5])
async def test_500_every_time_makes_exactly_attempts_max_requests_then_raises(twilio, attempts_max):
    twilio.fail_next(100, status=500)
    adapter = TwilioRest(_settings(twilio, attempts_max=attempts_max))
    try:
        with pytest.raises(TwilioRestError) as raised:
            await adapter.announce_to_conference(CONFERENCE_SID, ANNOUNCE_URL)
    finally:
        await adapter.close()

    assert len(twilio.requests) == attempts_max
    assert (raised.value.status, raised.value.attempts) == (500, attempts_max)


@pytest.mark.parametrize("status", [429, 502, 503])
async def test_429_and_other_5xx_are_retried(twilio, rest, status):
    twilio.fail_next(1, status=status)

    await rest.hang_up(CALL_SID)

    assert len(twilio.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_4xx_other_than_429_is_not_retried(twilio, rest, status):
    twilio.fail_next(1, status=status)

    with pytest.raises(TwilioRestError) as raised:
        await rest.hang_up(CALL_SID)

    assert len(twilio.requests) == 1
    assert (raised.value.status, raised.value.attempts) == (status, 1)


async def test_unknown_resource_404_is_not_retried(twilio, rest):
    adapter = TwilioRest(_settings(twilio, api_base_url=twilio.base_url + "/elsewhere"))
    try:
        with pytest.raises(TwilioRestError) as raised:
            await adapter.hang_up(CALL_SID)
    finally:
        await adapter.close()

    assert [r.path for r in twilio.requests] == ["/elsewhere" + CALL_PATH]
    assert raised.value.status == 404


async def test_dropped_connection_is_retried(twilio, rest):
    twilio.drop_next(2)

    await rest.hang_up(CALL_SID)

    assert len(twilio.requests) == 3


async def test_dropped_connection_every_time_raises_after_attempts_max(twilio, rest):
    twilio.drop_next(100)

    with pytest.raises(TwilioRestError) as raised:
        await rest.hang_up(CALL_SID)

    assert len(twilio.requests) == 3
    assert (raised.value.status, raised.value.attempts) == (None, 3)


async def test_unreachable_twilio_raises_after_attempts_max():
    async with RecordingTwilio() as gone:
        settings = _settings(gone)
    adapter = TwilioRest(settings)  # the port is closed now: connection refused
    try:
        with pytest.raises(TwilioRestError, match="connection_error") as raised:
            await adapter.hang_up(CALL_SID)
    finally:
        await adapter.close()
    assert raised.value.attempts == 3


async def test_slow_answer_times_out_and_is_retried(twilio):
    twilio.delay_next(1, seconds=30)  # cut short when the server stops
    adapter = TwilioRest(_settings(twilio, timeout_seconds=0.2))
    try:
        with capture_logs() as logs:
            await adapter.hang_up(CALL_SID)
    finally:
        await adapter.close()

    assert len(twilio.requests) == 2
    assert [entry["reason"] for entry in logs if "reason" in entry] == ["timeout"]


async def test_backoff_doubles_between_attempts(twilio):
    twilio.fail_next(2, status=500)
    adapter = TwilioRest(_settings(twilio, retry_backoff_seconds=0.05))
    try:
        await adapter.hang_up(CALL_SID)
    finally:
        await adapter.close()

    arrivals = [r.received_monotonic_seconds for r in twilio.requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1


async def test_each_failed_attempt_is_logged_without_the_auth_token(twilio, rest):
    twilio.fail_next(100, status=503)

    with capture_logs() as logs, pytest.raises(TwilioRestError) as raised:
        await rest.hang_up(CALL_SID)

    failures = [entry for entry in logs if entry["event"] == "twilio_rest_attempt_failed"]
    assert [(e["attempt"], e["status"], e["will_retry"]) for e in failures] == [
        (1, 503, True),
        (2, 503, True),
        (3, 503, False),
    ]
    assert all(e["call_sid"] == CALL_SID and e["log_level"] == "warning" for e in failures)
    assert AUTH_TOKEN not in repr(logs)
    assert AUTH_TOKEN not in str(raised.value) and AUTH_TOKEN not in repr(raised.value.__cause__)


def test_settings_repr_hides_the_auth_token():
    settings = TwilioRestSettings(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN)
    assert AUTH_TOKEN not in repr(settings)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attempts_max": 0},
        {"attempts_max": 1000},
        {"timeout_seconds": 0},
        {"retry_backoff_seconds": -1},
        {"api_base_url": "api.twilio.com"},
        {"account_sid": "not-an-account"},
        {"auth_token": ""},
    ],
)
def test_settings_refuse_unbounded_or_malformed_values(overrides):
    values = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN} | overrides
    with pytest.raises(ValueError):
        TwilioRestSettings(**values)


def test_adapter_can_be_built_outside_an_event_loop():
    adapter = TwilioRest(TwilioRestSettings(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN))
    asyncio.run(adapter.close())


async def test_close_is_idempotent_and_later_calls_are_refused(twilio, rest):
    await rest.hang_up(CALL_SID)
    await rest.close()
    await rest.close()

    with pytest.raises(RuntimeError, match="closed"):
        await rest.hang_up(CALL_SID)
    assert len(twilio.requests) == 1


async def test_adapter_works_against_the_threaded_server():
    with RecordingTwilio.start_in_thread() as server:
        server.fail_next(1, status=500)
        adapter = TwilioRest(_settings(server))
        try:
            await adapter.hang_up(CALL_SID)
        finally:
            await adapter.close()
        assert [r.form for r in server.requests] == [[("Status", "completed")]] * 2


def test_threaded_server_answers_like_twilio_and_stops():
    server = RecordingTwilio.start_in_thread()
    try:
        request = urllib.request.Request(
            server.base_url + CALL_PATH, data=b"Status=completed", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
    finally:
        server.stop()
    server.stop()

    assert (body["sid"], body["account_sid"], body["status"]) == (
        CALL_SID,
        ACCOUNT_SID,
        "completed",
    )
    assert [r.path for r in server.requests] == [CALL_PATH]
    with pytest.raises(OSError):
        urllib.request.urlopen(server.base_url + CALL_PATH, timeout=1)
