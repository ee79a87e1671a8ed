"""End-to-end against the real `meterd run` process: signed, realistic Twilio callbacks for the
call shapes docs/billing.md names, with the exact billable seconds, agent-minutes and hold
seconds worked out by hand beside each assertion."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.twilio_payloads import encode_form, sign

from .daemon import Daemon

TWILIO_TOKEN = "e2e-twilio-token-0123456789abcdef"
AGENTS_TOKEN = "e2e-agents-token-0123456789abcdef"
PUBLIC_BASE_URL = "https://calls.example.com:8443/meterd"  # a port and a path prefix
# Calls happened an hour ago, so research intervals on them are in the past.
BASE = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    daemon = Daemon(
        tmp_path_factory.mktemp("timelines"),
        env={
            "METERD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "METERD_AGENTS_TOKEN": AGENTS_TOKEN,
            "METERD_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            # the calls ended an hour ago by their timestamps: without a longer delay a tick
            # could settle one between its end and research posted after it (a loaded machine
            # made test_research_after_the_caller_hung_up get 409 "settled")
            "METERD_SETTLE_DELAY_SECONDS": "7200",
        },
    ).start()
    status, _ = daemon.admin(
        "POST",
        "/admin/accounts",
        {
            "account_id": "acme",
            "name": "Acme",
            "plan": "service_agreement",
            "caller_ids": [CUSTOMER_NUMBER],
        },
    )
    assert status == 201
    yield daemon
    assert daemon.stop() == 0


def post_twilio(daemon: Daemon, path: str, params: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(
        daemon.base_url + path, data=encode_form(params), method="POST"
    )
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    request.add_header("X-Twilio-Signature", sign(PUBLIC_BASE_URL + path, params, TWILIO_TOKEN))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def research(daemon: Daemon, script: CallScript, agent: str, start: int, end: int) -> None:
    status, body = daemon.request(
        "POST",
        "/agents/research",
        {
            "call_sid": script.call_sid,
            "agent_id": agent,
            "start": script.at(start).isoformat(),
            "end": script.at(end).isoformat(),
        },
        token=AGENTS_TOKEN,
    )
    assert status == 200, body


def play(daemon: Daemon, script: CallScript) -> dict:
    status, twiml = post_twilio(daemon, "/twilio/voice", script.voice())
    assert status == 200 and f">{script.call_sid}</Conference>" in twiml
    for params in script.events:
        assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
    for params in script.status_events:
        assert post_twilio(daemon, "/twilio/call-status", params)[0] == 204
    return view(daemon, script)


def view(daemon: Daemon, script: CallScript) -> dict:
    status, body = daemon.admin("GET", f"/admin/calls/{script.call_sid}")
    assert status == 200, body
    return body


def minutes_and_seconds(body: dict) -> dict[str, tuple[int, int]]:
    return {
        agent: (time["billable_seconds"], time["agent_minutes"])
        for agent, time in body["agents"].items()
    }


def test_single_agent(daemon):
    script = CallScript(101, BASE)
    script.join("customer", 0).join("agent:alice", 30).leave("agent:alice", 330).end(340)
    body = play(daemon, script)
    # alice active 30..330 = 300 s = 5 minutes exactly
    assert minutes_and_seconds(body) == {"alice": (300, 5)}
    # hold: waiting 0..30 (30 s) + alone after alice left 330..340 (10 s) = 40 s
    assert body["hold_seconds"] == 40
    assert body["status"] == "ended"


def test_customer_on_hold(daemon):
    script = CallScript(102, BASE)
    script.join("customer", 0).join("agent:alice", 20).hold("customer", 80)
    script.unhold("customer", 200).leave("agent:alice", 320).end(320)
    body = play(daemon, script)
    # active 20..80 (60 s) + 200..320 (120 s) = 180 s = 3 minutes; on hold 80..200 is not
    assert minutes_and_seconds(body) == {"alice": (180, 3)}
    # hold: 0..20 (20 s) + 80..200 (120 s) = 140 s
    assert body["hold_seconds"] == 140


def test_agent_on_hold(daemon):
    script = CallScript(103, BASE)
    script.join("customer", 0).join("agent:alice", 10).hold("agent:alice", 70)
    script.unhold("agent:alice", 130).leave("agent:alice", 250).end(250)
    body = play(daemon, script)
    # active 10..70 (60 s) + 130..250 (120 s) = 180 s = 3 minutes
    assert minutes_and_seconds(body) == {"alice": (180, 3)}
    # hold: 0..10 (10 s) + agent on hold 70..130 (60 s) = 70 s
    assert body["hold_seconds"] == 70


def test_two_agents_overlapping(daemon):
    script = CallScript(104, BASE)
    script.join("customer", 0).join("agent:alice", 10).join("agent:bob", 100)
    script.leave("agent:bob", 250).leave("agent:alice", 310).end(320)
    body = play(daemon, script)
    # alice 10..310 = 300 s = 5 minutes; bob 100..250 = 150 s = ceil(2.5) = 3 minutes
    assert minutes_and_seconds(body) == {"alice": (300, 5), "bob": (150, 3)}
    # hold: 0..10 (10 s) + 310..320 (10 s) = 20 s; the overlap is no hold
    assert body["hold_seconds"] == 20


def test_research_while_the_customer_is_on_hold(daemon):
    script = CallScript(105, BASE)
    script.join("customer", 0).join("agent:alice", 10).hold("customer", 70)
    script.unhold("customer", 190).leave("agent:alice", 250).end(250)
    play(daemon, script)
    research(daemon, script, "alice", 70, 190)
    body = view(daemon, script)
    # active 10..70 (60 s) + 190..250 (60 s); research 70..190 (120 s) while the customer is
    # on hold; billable = union = 10..250 = 240 s = 4 minutes
    assert minutes_and_seconds(body) == {"alice": (240, 4)}
    assert body["agents"]["alice"]["research_seconds"] == 120
    # hold is still recorded: 0..10 (10 s) + 70..190 (120 s) = 130 s, never charged
    assert body["hold_seconds"] == 130


def test_research_after_the_caller_hung_up(daemon):
    script = CallScript(106, BASE)
    script.join("customer", 0).join("agent:alice", 10).end(130)
    play(daemon, script)
    research(daemon, script, "alice", 130, 430)
    body = view(daemon, script)
    # active 10..130 (120 s) + research 130..430 (300 s) after hang-up = 420 s = 7 minutes
    assert minutes_and_seconds(body) == {"alice": (420, 7)}
    # hold: 0..10 = 10 s (the customer alone before alice joined)
    assert body["hold_seconds"] == 10


def test_caller_hung_up_before_any_agent(daemon):
    script = CallScript(107, BASE)
    script.join("customer", 0).end(45)
    body = play(daemon, script)
    # nobody answered: no agent, no billable time; the 45 s wait is hold
    assert body["agents"] == {}
    assert body["hold_seconds"] == 45
    assert body["status"] == "ended"


def test_a_repeated_and_reordered_delivery_changes_nothing(daemon):
    script = CallScript(108, BASE)
    script.join("customer", 0).join("agent:alice", 30).leave("agent:alice", 330).end(340)
    status, _ = post_twilio(daemon, "/twilio/voice", script.voice())
    assert status == 200
    for params in [*reversed(script.events), *script.events, *script.status_events]:
        assert (
            post_twilio(
                daemon,
                "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status",
                params,
            )[0]
            == 204
        )
    # the same as test_single_agent: 300 s = 5 minutes, 40 s hold
    body = view(daemon, script)
    assert minutes_and_seconds(body) == {"alice": (300, 5)}
    assert body["hold_seconds"] == 40


def test_a_forged_webhook_is_refused_by_the_daemon(daemon):
    params = CallScript(109, BASE).voice()
    request = urllib.request.Request(
        daemon.base_url + "/twilio/voice", data=encode_form(params), method="POST"
    )
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    request.add_header(
        "X-Twilio-Signature",
        sign(PUBLIC_BASE_URL + "/twilio/voice", params, "not-the-token-0123456789abcdef"),
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert json.loads(refused.value.read())["error"] == "bad_signature"
    assert daemon.admin("GET", f"/admin/calls/{CallScript(109, BASE).call_sid}")[0] == 404
    rejections = [
        json.loads(line) for line in daemon.log().splitlines() if "twilio webhook rejected" in line
    ]
    assert rejections[-1]["call_sid"] == params["CallSid"]
    assert rejections[-1]["reason"] == "bad_signature"
    assert TWILIO_TOKEN not in daemon.log()


def test_access_log_lines_carry_the_call_sid(daemon):
    script = CallScript(110, BASE)
    post_twilio(daemon, "/twilio/voice", script.voice())
    deadline = time.monotonic() + 10  # the access line is written just after the answer
    while True:
        access = [
            json.loads(line)
            for line in daemon.log().splitlines()
            if '"path": "/twilio/voice"' in line and '"event": "request"' in line
        ]
        found = any(line.get("call_sid") == script.call_sid for line in access)
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert found
