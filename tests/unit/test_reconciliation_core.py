"""The pure comparison of Twilio's call records with meterd's (`core/reconciliation.py`)."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from meterd.core.reconciliation import MeterdCall, TwilioCall, reconcile

START = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
END = START + dt.timedelta(days=1)
SIDS = [f"CA{n:032d}" for n in range(8)]


def _moment(offset_hours: int) -> dt.datetime:
    return START + dt.timedelta(hours=offset_hours)


twilio_calls = st.lists(
    st.builds(
        TwilioCall,
        sid=st.sampled_from(SIDS),
        start_time=st.integers(-2, 26).map(_moment),
        duration_seconds=st.one_of(st.none(), st.integers(0, 600)),
        direction=st.sampled_from(["inbound", "outbound-dial", "outbound-api"]),
        status=st.just("completed"),
        parent_call_sid=st.one_of(st.none(), st.just(SIDS[0])),
    )
)
meterd_calls = st.lists(
    st.builds(
        MeterdCall,
        sid=st.sampled_from(SIDS),
        started_at=st.integers(-2, 26).map(_moment),
        ended_at=st.none(),
        status=st.just("ended"),
    ),
    unique_by=lambda call: call.sid,  # a call sid is meterd's primary key
)


@given(twilio_calls, meterd_calls, st.sets(st.sampled_from(SIDS)))
def test_every_call_is_reported_at_most_once_and_every_one_is_accounted_for(
    theirs, ours, participants
):
    found = reconcile(
        theirs, ours, participant_sids=participants, start=START, end=END, tolerance_seconds=5
    )
    reported = [c.sid for c in found.missing_in_meterd] + [c.sid for c in found.missing_at_twilio]
    assert len(reported) == len(set(reported))
    ours_in_day = {c.sid for c in ours if START <= c.started_at < END}
    assert len(found.missing_at_twilio) + found.matched == len(ours_in_day)
    assert {d.sid for d in found.duration_differs} <= ours_in_day
    for call in found.missing_in_meterd:
        assert call.direction == "inbound" and not call.parent_call_sid
        assert call.sid not in ours_in_day and call.sid not in participants


def test_a_length_within_the_tolerance_matches():
    theirs = [TwilioCall(SIDS[1], _moment(1), 125, "inbound", "completed")]
    ours = [MeterdCall(SIDS[1], _moment(1), _moment(1) + dt.timedelta(seconds=120), "ended")]
    kept = dict(participant_sids=set(), start=START, end=END)
    assert reconcile(theirs, ours, tolerance_seconds=5, **kept).clean
    assert not reconcile(theirs, ours, tolerance_seconds=4, **kept).clean
