"""A timeline knows whether each agent's billable time is running at `now`, apart from its
intervals (which are empty at the very second time starts running), and the next minute's due
time follows from it: so a tick in the same second as a join, an unhold or a research start
never leaves a live call without a next due time (issue 11, defect 1)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meterd.core import rating
from meterd.core.timeline import ConferenceEvent, ResearchMark, build_timeline
from tests.unit.test_timeline import Call, realistic_calls

T0 = 1_700_000_000


def test_an_agent_joining_in_the_ticks_second_owes_minute_one_at_once():
    events = [
        ConferenceEvent(1, T0, "participant-join", "CAcust", "customer"),
        ConferenceEvent(2, T0 + 150, "participant-join", "CAalice", "agent:alice"),
    ]
    timeline = build_timeline(events, [], now_seconds=T0 + 150, research_max_seconds=7200)
    alice = timeline.agents["alice"]
    assert alice.billable_seconds == 0 and alice.accruing
    assert rating.minutes_due_live(alice.billable_seconds, alice.accruing, 60) == 1
    due = rating.next_minute_due_at_seconds(
        billable_seconds=0,
        accruing=True,
        minutes_posted=1,
        increment_seconds=60,
        now_seconds=T0 + 150,
    )
    assert due == T0 + 210  # minute 2 once 60 s have run


def test_research_started_in_the_ticks_second_after_hang_up_is_accruing():
    timeline = build_timeline(
        [],
        [ResearchMark("alice", T0 + 300, None)],
        now_seconds=T0 + 300,
        research_max_seconds=7200,
        call_ended_at_seconds=T0 + 200,
    )
    assert timeline.agents["alice"].accruing


def test_research_at_its_limit_no_longer_accrues():
    timeline = build_timeline(
        [], [ResearchMark("alice", T0, None)], now_seconds=T0 + 60, research_max_seconds=60
    )
    assert not timeline.agents["alice"].accruing
    assert timeline.agents["alice"].billable_seconds == 60


def test_a_join_stamped_ahead_of_our_clock_owes_minute_one_at_once():
    events = [
        ConferenceEvent(1, T0, "participant-join", "CAcust", "customer"),
        ConferenceEvent(2, T0 + 2, "participant-join", "CAalice", "agent:alice"),
    ]
    timeline = build_timeline(events, [], now_seconds=T0, research_max_seconds=7200)
    alice = timeline.agents["alice"]
    assert alice.accruing and rating.minutes_due_live(alice.billable_seconds, True, 60) == 1


@given(
    billable=st.integers(0, 10_000), accruing=st.booleans(), increment=st.sampled_from([1, 6, 60])
)
def test_live_minutes_are_the_final_count_or_the_one_beginning_now(
    billable: int, accruing: bool, increment: int
) -> None:
    """Never fewer than the final rule; at most the minute that begins this instant more."""
    final = rating.minutes_due(billable, increment)
    live = rating.minutes_due_live(billable, accruing, increment)
    assert final <= live <= final + 1
    if accruing:  # one more second of billable time needs no more minutes than are due now
        assert rating.minutes_due(billable + 1, increment) <= live


@settings(max_examples=150, deadline=None)
@given(call=realistic_calls())
def test_accruing_means_billable_time_grows_in_the_next_second(call: Call) -> None:
    """With everything known up to `now` (no event or research end stamped later), an agent is
    accruing exactly when one more second of `now` adds one billable second."""
    now = call.now_seconds
    assume(all(e.at_seconds <= now for e in call.events))
    assume(call.call_ended_at_seconds is None or call.call_ended_at_seconds <= now)
    assume(all(m.start_seconds <= now and (m.end_seconds or now) <= now for m in call.research))
    assume(call.research_max_seconds > 0)
    at_now = call.build()
    later = replace(call, now_seconds=now + 1).build()
    for agent_id, time in at_now.agents.items():
        grown = later.agents[agent_id].billable_seconds - time.billable_seconds
        assert grown == (1 if time.accruing else 0), agent_id
