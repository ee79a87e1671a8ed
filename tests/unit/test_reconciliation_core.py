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


def test_a_callback_is_compared_and_other_rest_placed_calls_are_not_missing():
    """Issue 17: a callback meterd placed is Twilio's `outbound-api` call; an agent's leg the
    desk placed through the REST API is one too, and is not meterd's to have."""
    placed = _moment(2) + dt.timedelta(seconds=20)
    theirs = [
        TwilioCall(SIDS[1], _moment(2), 300, "outbound-api", "completed"),
        TwilioCall(SIDS[2], _moment(3), 600, "outbound-api", "completed"),  # an agent's leg
        TwilioCall(SIDS[3], _moment(4), 0, "outbound-api", "no-answer"),
    ]
    ours = [
        MeterdCall(SIDS[1], placed, placed + dt.timedelta(seconds=300), "ended"),
        MeterdCall(SIDS[3], _moment(4), _moment(4) + dt.timedelta(seconds=30), "rejected"),
    ]
    found = reconcile(
        theirs, ours, participant_sids={SIDS[2]}, start=START, end=END, tolerance_seconds=5
    )
    assert found.clean and found.matched == 2
    longer = [MeterdCall(SIDS[1], placed, placed + dt.timedelta(seconds=400), "ended")]
    found = reconcile(
        theirs, longer, participant_sids=set(), start=START, end=END, tolerance_seconds=5
    )
    assert [d.sid for d in found.duration_differs] == [SIDS[1]] and not found.missing_in_meterd


def test_a_length_within_the_tolerance_matches():
    theirs = [TwilioCall(SIDS[1], _moment(1), 125, "inbound", "completed")]
    ours = [MeterdCall(SIDS[1], _moment(1), _moment(1) + dt.timedelta(seconds=120), "ended")]
    kept = dict(participant_sids=set(), start=START, end=END)
    assert reconcile(theirs, ours, tolerance_seconds=5, **kept).clean
    assert not reconcile(theirs, ours, tolerance_seconds=4, **kept).clean
