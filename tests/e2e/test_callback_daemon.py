"""Issue 17, acceptance 1, against the real daemon: a callback to a per-minute customer with 3
banked minutes.

`meterd run` (increment 5 s, so three minutes take 15 s; warn at 2 minutes left; grace 5 s)
with its Twilio REST adapter pointed at the recording server (tests/recording_server.py), which
answers the Calls create with a new sid and records the request. The agent's tool asks for the
callback; the customer answers (Twilio's signed request to the URL meterd gave it); the
conference events arrive as Twilio sends them. meterd posts the minutes live, warns, announces
"no minutes left" with minute 3, hangs up the grace period later; the call ends and settles at
the 3 banked minutes and every later minute owed, and `meterd ledger check` passes. About 25 s.
"""

from __future__ import annotations

import datetime as dt
import re
import time

from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.recording_server import RecordingTwilio
from tests.twilio_payloads import ACCOUNT_SID, SUPPORT_NUMBER, voice_params

from .daemon import Daemon, run_cli
from .test_call_timelines import post_twilio
from .test_metering_daemon import AGENTS_TOKEN, PUBLIC_BASE_URL, daemon_env, wait_for

GRACE_SECONDS = 5


def _call_view(daemon: Daemon, call_sid: str) -> dict:
    status, view = daemon.admin("GET", f"/admin/calls/{call_sid}")
    assert status == 200, view
    return view


def test_a_callback_with_3_banked_minutes_runs_out_is_hung_up_and_settles(tmp_path):
    with RecordingTwilio.start_in_thread() as twilio:
        daemon = Daemon(
            tmp_path,
            env=daemon_env(
                METERD_TWILIO_ACCOUNT_SID=ACCOUNT_SID,
                METERD_TWILIO_API_BASE_URL=twilio.base_url,
                METERD_CALLBACK_FROM_NUMBER=SUPPORT_NUMBER,
                METERD_INCREMENT_SECONDS="5",
                METERD_ON_EXHAUSTED="announce",
                METERD_WARN_MINUTES_LEFT="2",
                METERD_GRACE_SECONDS=str(GRACE_SECONDS),
                METERD_TICK_INTERVAL_SECONDS="1",
            ),
        ).start()
        try:
            body = {
                "account_id": "acme",
                "name": "Acme",
                "plan": "per_minute",
                "caller_ids": [CUSTOMER_NUMBER],
                "products": [],
            }
            assert daemon.admin("POST", "/admin/accounts", body)[0] == 201
            grant = {"minutes": 3, "reference": "banked"}
            assert daemon.admin("POST", "/admin/accounts/acme/minutes", grant)[0] == 201
            asked = {"client_reference": "crm-1", "account_id": "acme", "agent_id": "alice"}
            status, callback = daemon.request(
                "POST", "/agents/callbacks", asked | {"to": CUSTOMER_NUMBER}, token=AGENTS_TOKEN
            )
            assert status == 201, callback
            [(call_sid, created)] = twilio.created_calls
            assert callback["call_sid"] == call_sid
            answer_path = f"/twilio/callback?callback={callback['callback_id']}"
            assert created["Url"] == PUBLIC_BASE_URL + answer_path
            assert created["StatusCallback"] == f"{PUBLIC_BASE_URL}/twilio/call-status"
            assert (created["To"], created["From"]) == (CUSTOMER_NUMBER, SUPPORT_NUMBER)

            # the customer answers: Twilio asks meterd's URL for the call's TwiML
            answered = voice_params(
                call_sid,
                SUPPORT_NUMBER,
                CUSTOMER_NUMBER,
                Direction="outbound-api",
                CallStatus="in-progress",
            )
            status, twiml = post_twilio(daemon, answer_path, answered)
            assert status == 200 and re.search(rf">{call_sid}</Conference>", twiml), twiml
            script = CallScript(
                1, dt.datetime.now(dt.UTC).replace(microsecond=0), given_call_sid=call_sid
            )
            script.join("customer", 0).join("agent:alice", 0)
            joined = time.monotonic()
            for params in script.events:
                assert post_twilio(daemon, "/twilio/conference", params)[0] == 204

            hang_up = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{call_sid}.json"
            wait_for(lambda: any(r.path == hang_up for r in twilio.requests), "the hang-up request")
            requests = twilio.requests
            minutes_live = _call_view(daemon, call_sid)["charges"]["bank_minutes"]
            offset = int((dt.datetime.now(dt.UTC) - script.base).total_seconds())
            script.leave("agent:alice", offset).end(offset)
            for params in script.events[3:]:
                assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
            for params in script.status_events:
                assert post_twilio(daemon, "/twilio/call-status", params)[0] == 204
            view = wait_for(
                lambda: (v := _call_view(daemon, call_sid))["settled_at"] and v, "settlement"
            )
            status, outcome = daemon.request(
                "GET", f"/agents/callbacks/{callback['callback_id']}", token=AGENTS_TOKEN
            )
        finally:
            assert daemon.stop() == 0

    conference = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Conferences/{script.conference_sid}.json"
    told = [
        (r.path.rpartition("/")[2], r.form_dict.get("AnnounceUrl", "").rpartition("=")[2])
        for r in requests
    ]
    at = {
        r.form_dict.get("AnnounceUrl", "hang_up").rpartition("=")[2]: round(
            r.received_monotonic_seconds - joined, 1
        )
        for r in requests
        if r.path in (conference, hang_up)
    }
    print(f"\ncallback: Twilio was asked {told}; seconds after the agent joined: {at}")
    assert [r.path for r in requests] == [
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json",
        conference,
        conference,
        hang_up,
    ], told
    # minute 1 at once leaves 2 (the warning); minute 3 at 10 s leaves none; 5 s later, the end
    assert at["warn"] <= 3 and 9 <= at["exhausted"] <= 13, at
    assert GRACE_SECONDS - 1 <= at["hang_up"] - at["exhausted"] <= GRACE_SECONDS + 3, at
    assert minutes_live == 3  # posted live, before the call ended
    assert view["direction"] == "outbound"
    # settled exactly: the bank's 3 minutes, then every later minute owed at the rate (100)
    minutes = view["agents"]["alice"]["agent_minutes"]
    charges = view["charges"]
    assert minutes >= 3 and charges["bank_minutes"] == 3, (minutes, charges)
    assert charges["owed_minor"] == (minutes - 3) * 100, (minutes, charges)
    assert status == 200 and outcome["outcome"] == "completed", outcome
    check = run_cli(["ledger", "check"], daemon.env, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
