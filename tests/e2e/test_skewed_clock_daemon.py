"""Issue 11, acceptance 3 (defect 1) against the real daemon: Twilio's timestamps 2 s AHEAD of
meterd's clock.

Two calls start together on one `meterd run` (tick every second, the smallest setting), each
with its join events stamped 2 s after the moment they are delivered:

- `plenty` (45 banked minutes): minute 1 is posted within 2 s of the agent joining, minute 2
  about 60 s after minute 1. Before the fix the tick's next due time fell to null on such a
  join and no minute came at all (no minute after 70 s).
- `two` (2 banked minutes, `on_exhausted = "announce"`, `warn_minutes_left = 2`, grace 10 s):
  minute 1 at once leaves 1, so the warning is announced at once; minute 2, about 60 s on,
  leaves none, so "no minutes left" is announced; 10 s later meterd asks Twilio to end the call.
  What meterd asks of Twilio is recorded by tests/recording_server.py standing in for Twilio's
  REST API.

Before the fix (b1d95ef) no minute came in 85 s on either call: only the warning went out (at
connect), never "no minutes left" nor the hang-up.

Milestones are measured by polling the call view (`charges.bank_minutes`) every 0.1 s and by the
recording server's arrival times, against the monotonic time the agent's join was sent. About
75 s in all. Then the calls end and `meterd ledger check` passes.
"""

from __future__ import annotations

import datetime as dt
import time

from tests.call_scripts import CallScript
from tests.recording_server import RecordingTwilio
from tests.twilio_payloads import ACCOUNT_SID

from .daemon import Daemon, run_cli
from .test_call_timelines import post_twilio
from .test_metering_daemon import daemon_env

SKEW = dt.timedelta(seconds=2)  # Twilio's clock ahead of meterd's
GRACE_SECONDS = 10
POLL_SECONDS = 0.1
DEADLINE_SECONDS = 85
PLENTY, TWO = "+14155550101", "+14155550102"


def _account(daemon: Daemon, account_id: str, number: str, minutes: int | None) -> None:
    body = {
        "account_id": account_id,
        "name": account_id,
        "plan": "per_minute",
        "caller_ids": [number],
        "products": [] if minutes is not None else [{"product": "desktop", "kind": "license"}],
    }
    status, answer = daemon.admin("POST", "/admin/accounts", body)
    assert status == 201, answer
    if minutes:
        grant = {"minutes": minutes, "reference": "banked"}
        status, answer = daemon.admin("POST", f"/admin/accounts/{account_id}/minutes", grant)
        assert status == 201, answer


def _start(daemon: Daemon, n: int, number: str) -> tuple[CallScript, float]:
    """Connect a call whose events Twilio stamps 2 s ahead; return it and the monotonic time
    its agent's join was sent."""
    script = CallScript(n, dt.datetime.now(dt.UTC).replace(microsecond=0) + SKEW, number)
    status, twiml = post_twilio(daemon, "/twilio/voice", script.voice())
    assert status == 200 and "<Conference" in twiml, twiml
    script.join("customer", 0).join("agent:alice", 0)
    for params in script.events[:-1]:  # conference start, customer join
        assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
    joined = time.monotonic()
    assert post_twilio(daemon, "/twilio/conference", script.events[-1])[0] == 204
    return script, joined


def _end(daemon: Daemon, script: CallScript) -> None:
    offset = int((dt.datetime.now(dt.UTC) + SKEW - script.base).total_seconds())
    script.leave("agent:alice", offset).end(offset)
    for params in script.events[3:]:
        assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
    for params in script.status_events:
        assert post_twilio(daemon, "/twilio/call-status", params)[0] == 204


def _bank_minutes(daemon: Daemon, script: CallScript) -> int:
    status, view = daemon.admin("GET", f"/admin/calls/{script.call_sid}")
    assert status == 200, view
    return view["charges"]["bank_minutes"]


def test_twilio_2_s_ahead_minutes_on_time_and_two_banked_minutes_warn_and_hang_up(tmp_path):
    with RecordingTwilio.start_in_thread() as twilio:
        daemon = Daemon(
            tmp_path,
            env=daemon_env(
                METERD_TWILIO_ACCOUNT_SID=ACCOUNT_SID,
                METERD_TWILIO_API_BASE_URL=twilio.base_url,
                METERD_ON_EXHAUSTED="announce",
                METERD_WARN_MINUTES_LEFT="2",
                METERD_GRACE_SECONDS=str(GRACE_SECONDS),
                METERD_TICK_INTERVAL_SECONDS="1",
            ),
        ).start()
        try:
            _account(daemon, "plenty", PLENTY, None)  # a licence: 45 included minutes
            _account(daemon, "two", TWO, 2)
            plenty, plenty_joined = _start(daemon, 1, PLENTY)
            two, two_joined = _start(daemon, 2, TWO)

            minute_at: dict[int, float] = {}  # plenty's minute n: seconds after its join
            conference = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Conferences/{two.conference_sid}.json"
            hang_up = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{two.call_sid}.json"
            while time.monotonic() < plenty_joined + DEADLINE_SECONDS:
                taken = _bank_minutes(daemon, plenty)
                for n in range(1, taken + 1):
                    minute_at.setdefault(n, time.monotonic() - plenty_joined)
                if len(minute_at) >= 2 and any(r.path == hang_up for r in twilio.requests):
                    break
                time.sleep(POLL_SECONDS)
            requests = list(twilio.requests)
            two_minutes = _bank_minutes(daemon, two)
            _end(daemon, plenty)
            _end(daemon, two)
        finally:
            assert daemon.stop() == 0

    told = [
        (
            r.path,
            r.form_dict.get("AnnounceUrl", "").rpartition("message=")[2] or r.form_dict,
            round(r.received_monotonic_seconds - two_joined, 1),
        )
        for r in requests
    ]
    print(f"\nplenty: minutes at {minute_at} s after the join; two: Twilio was asked {told}")

    # plenty: minute 1 within 2 s of the agent joining, minute 2 about 60 s after minute 1
    assert 1 in minute_at, f"no minute in {DEADLINE_SECONDS} s (the tick stalled)"
    assert minute_at[1] <= 2.0 + POLL_SECONDS, minute_at
    assert 2 in minute_at, f"minute 2 never came: {minute_at}"
    assert 57 <= minute_at[2] - minute_at[1] <= 63, minute_at
    assert 3 not in minute_at, minute_at  # minute 3 is due at 120 s

    # two: warned at once, "no minutes left" with minute 2, hung up the grace period later
    assert all(r.path in (conference, hang_up) for r in requests), told
    announcements = [r for r in requests if r.path == conference]
    messages = [r.form_dict["AnnounceUrl"].rpartition("message=")[2] for r in announcements]
    assert messages == ["warn", "exhausted"], told
    warned, exhausted = (r.received_monotonic_seconds - two_joined for r in announcements)
    assert warned <= 3, told
    assert 58 <= exhausted <= 65, told
    ended = [r for r in requests if r.path == hang_up]
    assert len(ended) == 1 and ended[0].form_dict["Status"] == "completed", told
    waited = ended[0].received_monotonic_seconds - two_joined - exhausted
    assert GRACE_SECONDS - 1 <= waited <= GRACE_SECONDS + 3, told
    assert two_minutes == 2, two_minutes  # both banked minutes were used (the rest is owed)

    check = run_cli(["ledger", "check"], daemon.env, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
