"""meterd.core.timeline: hand-worked calls first, then properties over generated event streams."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterd.core.timeline import (
    ConferenceEvent,
    Interval,
    ResearchMark,
    Timeline,
    TimelineEntry,
    agent_minutes,
    build_timeline,
    ceil_div,
    difference,
    intersection,
    union,
)

T0 = 1_700_000_000  # an epoch second; every hand-worked call starts here
CUSTOMER = "CAcustomer"
ALICE = "CAalice"
BOB = "CAbob"
HOUR_SECONDS = 3600
RESEARCH_MAX_SECONDS = 7200  # research_max_minutes default 120


class Stream:
    """Builds one conference's events with increasing sequence numbers, times relative to T0."""

    def __init__(self) -> None:
        self.events: list[ConferenceEvent] = []

    def add(
        self, at: int, kind: str, call_sid: str = "", label: str = "", hold: bool | None = None
    ) -> Stream:
        event = ConferenceEvent(len(self.events), T0 + at, kind, call_sid, label, hold)
        self.events.append(event)
        return self

    def join(self, at: int, call_sid: str, label: str, hold: bool | None = None) -> Stream:
        return self.add(at, "participant-join", call_sid, label, hold)

    def leave(self, at: int, call_sid: str, label: str = "") -> Stream:
        return self.add(at, "participant-leave", call_sid, label)

    def hold(self, at: int, call_sid: str, label: str = "") -> Stream:
        return self.add(at, "participant-hold", call_sid, label, True)

    def unhold(self, at: int, call_sid: str, label: str = "") -> Stream:
        return self.add(at, "participant-unhold", call_sid, label, False)

    def end(self, at: int) -> Stream:
        return self.add(at, "conference-end")


def iv(start: int, end: int) -> Interval:
    """An interval relative to T0."""
    return Interval(T0 + start, T0 + end)


def timeline(
    stream: Stream,
    research: tuple[ResearchMark, ...] = (),
    *,
    now: int = HOUR_SECONDS,
    call_ended_at: int | None = None,
) -> Timeline:
    return build_timeline(
        stream.events,
        research,
        now_seconds=T0 + now,
        research_max_seconds=RESEARCH_MAX_SECONDS,
        call_ended_at_seconds=None if call_ended_at is None else T0 + call_ended_at,
    )


def mark(agent_id: str, start: int, end: int | None) -> ResearchMark:
    return ResearchMark(agent_id, T0 + start, None if end is None else T0 + end)


# --- hand-worked calls -------------------------------------------------------------------------


def test_single_agent_is_billable_while_with_the_customer() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer")
        .join(10, ALICE, "agent:alice")
        .leave(130, ALICE)
        .leave(140, CUSTOMER)
        .end(140)
    )
    result = timeline(stream)
    # alice active 10..130 = 120 s; hold = waiting 0..10 (10 s) + after alice left 130..140 (10 s)
    assert result.agents["alice"].active == (iv(10, 130),)
    assert result.agents["alice"].research == ()
    assert result.agents["alice"].billable_seconds == 120
    assert result.hold == (iv(0, 10), iv(130, 140))
    assert result.hold_seconds == 20
    # 120 s / 60 rounded up = 2 agent-minutes
    assert agent_minutes(result.agents["alice"].billable_seconds, 60) == 2
    assert result.unlabelled_agents == ()
    assert [(e.at_seconds - T0, e.text) for e in result.entries] == [
        (0, "customer joined"),
        (10, "agent:alice joined"),
        (130, "agent:alice left"),
        (140, "customer left"),
        (140, "conference ended"),
    ]


def test_customer_on_hold_is_hold_time_not_active_time() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer")
        .join(10, ALICE, "agent:alice")
        .hold(70, CUSTOMER)
        .unhold(100, CUSTOMER)
        .leave(160, ALICE)
        .leave(160, CUSTOMER)
    )
    result = timeline(stream)
    # active = 10..70 (60 s) + 100..160 (60 s) = 120 s
    assert result.agents["alice"].active == (iv(10, 70), iv(100, 160))
    assert result.agents["alice"].active_seconds == 120
    # hold = 0..10 (10 s) + 70..100 (30 s) = 40 s
    assert result.hold == (iv(0, 10), iv(70, 100))
    assert result.hold_seconds == 40
    texts = [e.text for e in result.entries]
    assert "customer put on hold" in texts
    assert "customer taken off hold" in texts


def test_agent_on_hold_is_not_active_and_customer_waits_on_hold() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer")
        .join(10, ALICE, "agent:alice")
        .hold(70, ALICE)
        .unhold(100, ALICE)
        .leave(160, ALICE)
        .leave(160, CUSTOMER)
    )
    result = timeline(stream)
    # same arithmetic as the customer on hold: active 60 + 60 = 120 s, hold 10 + 30 = 40 s
    assert result.agents["alice"].active == (iv(10, 70), iv(100, 160))
    assert result.hold == (iv(0, 10), iv(70, 100))


def test_two_overlapping_agents_are_each_billable_and_hold_is_when_neither_is() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer")
        .join(10, ALICE, "agent:alice")
        .join(50, BOB, "agent:bob")
        .leave(100, ALICE)
        .leave(150, BOB)
        .leave(160, CUSTOMER)
    )
    result = timeline(stream)
    # alice 10..100 = 90 s, bob 50..150 = 100 s; 50..100 counts for both (two agent-minutes rule)
    assert result.agents["alice"].billable == (iv(10, 100),)
    assert result.agents["bob"].billable == (iv(50, 150),)
    # minutes: ceil(90/60) = 2, ceil(100/60) = 2, four agent-minutes for the call
    assert agent_minutes(90, 60) + agent_minutes(100, 60) == 4
    # hold: 0..10 + 150..160 = 20 s; union of billable 10..150 = 140 s (per_incident measure)
    assert result.hold_seconds == 20
    assert result.billable_union == (iv(10, 150),)
    assert result.billable_union_seconds == 140


def test_research_while_customer_on_hold_is_billable_and_still_hold_time() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer")
        .join(10, ALICE, "agent:alice")
        .hold(60, CUSTOMER)
        .unhold(120, CUSTOMER)
        .leave(200, ALICE)
        .leave(200, CUSTOMER)
    )
    result = timeline(stream, (mark("alice", 60, 120),))
    alice = result.agents["alice"]
    # active 10..60 (50 s) + 120..200 (80 s) = 130 s; research 60..120 = 60 s
    assert alice.active_seconds == 130
    assert alice.research == (iv(60, 120),)
    # billable = union = 10..200 = 190 s = 130 + 60, nothing counted twice
    assert alice.billable == (iv(10, 200),)
    assert alice.billable_seconds == 190
    # hold is recorded all the same: 0..10 + 60..120 = 70 s
    assert result.hold == (iv(0, 10), iv(60, 120))


def test_research_overlapping_active_time_is_counted_once() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").join(0, ALICE, "agent:alice").leave(100, ALICE)
    result = timeline(stream, (mark("alice", 50, 150), mark("alice", 120, 180)))
    alice = result.agents["alice"]
    # active 0..100, research 50..180 (two marks united); billable 0..180 = 180 s, not 100 + 130
    assert alice.research == (iv(50, 180),)
    assert alice.billable_seconds == 180


def test_research_continues_after_the_customer_hangs_up() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").join(10, ALICE, "agent:alice")
    result = timeline(stream, (mark("alice", 100, 400),), now=500, call_ended_at=100)
    alice = result.agents["alice"]
    # the customer's call ended at 100: active 10..100 = 90 s; research 100..400 = 300 s
    assert alice.active == (iv(10, 100),)
    assert alice.research == (iv(100, 400),)
    # billable 10..400 = 390 s -> ceil(390/60) = 7 agent-minutes
    assert alice.billable_seconds == 390
    assert agent_minutes(alice.billable_seconds, 60) == 7
    assert result.hold == (iv(0, 10),)
    assert TimelineEntry(T0 + 100, "call ended") in result.entries


def test_caller_who_hangs_up_before_any_agent_is_all_hold_and_no_agent() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").leave(45, CUSTOMER).end(45)
    result = timeline(stream)
    # 0..45 waiting = 45 s hold, nobody billable
    assert result.hold == (iv(0, 45),)
    assert result.hold_seconds == 45
    assert dict(result.agents) == {}
    assert result.billable_union_seconds == 0


def test_unlabelled_participant_is_an_agent_named_by_call_sid_and_listed() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer")
        .join(10, "CAnolabel", "")
        .join(20, "CAsupervisor", "supervisor")
        .leave(70, "CAnolabel")
        .leave(80, "CAsupervisor")
        .leave(90, CUSTOMER)
    )
    result = timeline(stream)
    # CAnolabel 10..70 = 60 s; CAsupervisor 20..80 = 60 s; hold 0..10 + 80..90 = 20 s
    assert result.agents["CAnolabel"].active_seconds == 60
    assert result.agents["CAsupervisor"].active_seconds == 60
    assert result.unlabelled_agents == ("CAnolabel", "CAsupervisor")
    assert result.hold_seconds == 20
    assert result.entries[1] == TimelineEntry(T0 + 10, "unlabelled participant CAnolabel joined")


def test_label_on_a_later_event_names_the_participant() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "")  # label missing on the join, present on a later event
        .join(10, ALICE, "")
        .hold(20, ALICE, "agent:alice")
        .unhold(30, ALICE)
        .leave(60, ALICE)
        .leave(60, CUSTOMER, "customer")
    )
    result = timeline(stream)
    # alice active 10..20 + 30..60 = 40 s; hold 0..10 + 20..30 = 20 s
    assert list(result.agents) == ["alice"]
    assert result.agents["alice"].active_seconds == 40
    assert result.hold_seconds == 20
    assert result.unlabelled_agents == ()


def test_open_interval_is_counted_up_to_now() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").join(30, ALICE, "agent:alice")
    result = timeline(stream, now=100)
    # live call: alice 30..now=100 = 70 s; hold 0..30 = 30 s
    assert result.agents["alice"].active == (iv(30, 100),)
    assert result.hold == (iv(0, 30),)


def test_open_research_is_capped_at_research_max_seconds() -> None:
    open_mark = (mark("alice", 100, None),)
    # forgotten research: 100 .. 100 + 7200 = 7300, though now is 10_000
    capped = timeline(Stream(), open_mark, now=10_000)
    assert capped.agents["alice"].research == (iv(100, 7300),)
    assert capped.agents["alice"].research_seconds == RESEARCH_MAX_SECONDS
    assert capped.entries[-1] == TimelineEntry(
        T0 + 7300, "agent:alice research closed at the 7200 s limit"
    )
    # still running under the cap: 100..now=500 = 400 s
    running = timeline(Stream(), open_mark, now=500)
    assert running.agents["alice"].research == (iv(100, 500),)


def test_closed_research_longer_than_the_limit_is_clipped_too() -> None:
    result = timeline(Stream(), (mark("alice", 0, 10_000),), now=20_000)
    # 0..10_000 would be 10_000 s; clipped to 0..7200
    assert result.agents["alice"].research == (iv(0, 7200),)


def test_duplicated_and_late_events_give_the_ordered_result() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer")
        .join(10, ALICE, "agent:alice")
        .hold(40, CUSTOMER)
        .unhold(50, CUSTOMER)
        .leave(100, ALICE)
        .leave(110, CUSTOMER)
    )
    ordered = timeline(stream)
    scrambled = Stream()
    scrambled.events = [*reversed(stream.events), stream.events[2], stream.events[0]]
    assert timeline(scrambled) == ordered
    # active 10..40 + 50..100 = 80 s
    assert ordered.agents["alice"].active_seconds == 80


def test_conference_end_closes_everyone() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").join(10, ALICE, "agent:alice").end(70)
    result = timeline(stream, now=1000)
    # 10..70 = 60 s, not up to now
    assert result.agents["alice"].active == (iv(10, 70),)
    assert result.hold == (iv(0, 10),)


def test_call_end_closes_the_customer_even_if_events_say_otherwise() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").join(10, ALICE, "agent:alice").leave(90, ALICE)
    result = timeline(stream, now=1000, call_ended_at=60)
    # customer's call ended at 60: alice active 10..60 = 50 s, the agent's last 30 s don't count
    assert result.agents["alice"].active == (iv(10, 60),)
    assert result.hold == (iv(0, 10),)


def test_join_on_hold_and_modify_hold_field_set_the_hold_state() -> None:
    stream = (
        Stream()
        .join(0, CUSTOMER, "customer", hold=True)
        .join(0, ALICE, "agent:alice")
        .add(30, "participant-modify", CUSTOMER, "customer", hold=False)
        .add(40, "participant-mute", CUSTOMER, "customer", hold=True)  # ignored kind
        .leave(90, CUSTOMER)
    )
    result = timeline(stream)
    # customer held 0..30 (hold 30 s), active 30..90 = 60 s
    assert result.hold == (iv(0, 30),)
    assert result.agents["alice"].active == (iv(30, 90),)


def test_timestamps_never_run_backwards() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").join(50, ALICE, "agent:alice")
    stream.add(40, "participant-leave", ALICE)  # later in sequence, stamped earlier
    stream.leave(100, CUSTOMER)
    result = timeline(stream)
    # the leave takes effect at 50, never before the join: no negative or empty interval
    assert result.agents["alice"].active == ()
    assert result.hold == (iv(0, 100),)


def test_a_late_stamped_hold_does_not_start_before_the_join() -> None:
    stream = Stream().join(10, CUSTOMER, "customer").join(10, ALICE, "agent:alice")
    stream.hold(5, CUSTOMER)  # after the joins in sequence, stamped 5 s before them
    stream.leave(100, CUSTOMER)
    result = timeline(stream)
    # the hold takes effect at 10: hold 10..100 = 90 s, not 5..100
    assert result.hold == (iv(10, 100),)
    assert result.agents["alice"].active == ()


def test_events_without_join_count_nothing() -> None:
    stream = Stream().join(0, CUSTOMER, "customer").unhold(10, ALICE, "agent:alice")
    stream.leave(50, CUSTOMER)
    result = timeline(stream)
    assert result.agents["alice"].active == ()
    assert result.hold_seconds == 50


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="research_max_seconds"):
        build_timeline([], [], now_seconds=0, research_max_seconds=-1)
    with pytest.raises(ValueError, match="customer_label"):
        build_timeline([], [], now_seconds=0, research_max_seconds=0, customer_label="")
    with pytest.raises(ValueError):
        Interval(10, 9)
    with pytest.raises(ValueError):
        agent_minutes(60, 0)


def test_agent_minutes_round_up() -> None:
    assert [agent_minutes(s, 60) for s in (0, 1, 59, 60, 61, 120, 121)] == [0, 1, 1, 1, 2, 2, 3]
    assert ceil_div(7201, 7200) == 2


def test_interval_helpers() -> None:
    a = (Interval(0, 10), Interval(10, 20), Interval(30, 40), Interval(5, 5))
    assert union(a) == (Interval(0, 20), Interval(30, 40))
    assert intersection(a, [Interval(15, 35)]) == (Interval(15, 20), Interval(30, 35))
    assert difference(a, [Interval(5, 32)]) == (Interval(0, 5), Interval(32, 40))
    assert Interval(3, 8).seconds == 5


# --- properties --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    events: tuple[ConferenceEvent, ...]
    research: tuple[ResearchMark, ...]
    now_seconds: int
    research_max_seconds: int
    call_ended_at_seconds: int | None

    def build(
        self,
        events: tuple[ConferenceEvent, ...] | None = None,
        research: tuple[ResearchMark, ...] | None = None,
    ) -> Timeline:
        return build_timeline(
            self.events if events is None else events,
            self.research if research is None else research,
            now_seconds=self.now_seconds,
            research_max_seconds=self.research_max_seconds,
            call_ended_at_seconds=self.call_ended_at_seconds,
        )


@st.composite
def realistic_calls(draw: st.DrawFn) -> Call:
    """A customer and up to three other legs joining, holding, unholding and leaving."""
    legs = [(CUSTOMER, "customer", draw(st.sampled_from(["join", "all", "later"])))]
    for n in range(draw(st.integers(0, 3))):
        label = draw(st.sampled_from([f"agent:a{n}", "agent:a0", "", "supervisor", "agent:"]))
        legs.append((f"CAleg{n}", label, draw(st.sampled_from(["join", "all", "later"]))))
    start = T0 + draw(st.integers(0, 100))
    at = start
    events: list[ConferenceEvent] = []

    def add(kind: str, call_sid: str = "", label: str = "", hold: bool | None = None) -> None:
        events.append(ConferenceEvent(len(events), at, kind, call_sid, label, hold))

    if draw(st.booleans()):
        add("conference-start")
    held: dict[str, bool | None] = {sid: None for sid, _, _ in legs}  # None: not in
    steps = st.tuples(
        st.integers(0, len(legs) - 1),
        st.sampled_from(["leave", "hold", "unhold", "modify"]),
        st.integers(0, 40),
        st.sampled_from([None, True, False]),
    )
    for index, action, step_seconds, hold_field in draw(st.lists(steps, max_size=25)):
        at += step_seconds
        call_sid, label, label_mode = legs[index]
        first = held[call_sid] is None
        sent_label = label if (label_mode == "all" or (label_mode == "join") == first) else ""
        if held[call_sid] is None:
            add("participant-join", call_sid, sent_label, hold_field)
            held[call_sid] = bool(hold_field)
        elif action == "leave":
            add("participant-leave", call_sid, sent_label, held[call_sid])
            held[call_sid] = None
        elif action == "hold":
            add("participant-hold", call_sid, sent_label, True if hold_field is not None else None)
            held[call_sid] = True
        elif action == "unhold":
            add(
                "participant-unhold",
                call_sid,
                sent_label,
                False if hold_field is not None else None,
            )
            held[call_sid] = False
        else:
            add("participant-modify", call_sid, sent_label, held[call_sid])
    ending = draw(st.sampled_from(["live", "conference-end", "call-ended"]))
    at += draw(st.integers(0, 40))
    call_ended_at = None
    if ending == "conference-end":
        add("conference-end")
    elif ending == "call-ended":
        call_ended_at = at
    now = at + draw(st.integers(-20, 300))
    agent_ids = ["a0", "a1", "a2", "CAleg0", "ghost"]
    marks = draw(
        st.lists(
            st.builds(
                ResearchMark,
                st.sampled_from(agent_ids),
                st.integers(start - 50, now + 50),
                st.none() | st.integers(start - 50, now + 400),
            ),
            max_size=4,
        )
    )
    research_max = draw(st.sampled_from([0, 30, 120, 7200]))
    return Call(tuple(events), tuple(marks), now, research_max, call_ended_at)


@st.composite
def arbitrary_calls(draw: st.DrawFn) -> Call:
    """Any events at all: colliding sequence numbers, odd kinds, times running backwards."""
    event = st.builds(
        ConferenceEvent,
        st.integers(0, 6),
        st.integers(T0, T0 + 200),
        st.sampled_from(
            [
                "conference-start",
                "conference-end",
                "participant-join",
                "participant-leave",
                "participant-hold",
                "participant-unhold",
                "participant-modify",
                "participant-mute",
            ]
        ),
        st.sampled_from(["", CUSTOMER, ALICE, BOB]),
        st.sampled_from(["", "customer", "agent:alice", "agent:bob"]),
        st.none() | st.booleans(),
    )
    events = tuple(draw(st.lists(event, max_size=20)))
    mark_strategy = st.builds(
        ResearchMark,
        st.sampled_from(["alice", "bob"]),
        st.integers(T0, T0 + 200),
        st.none() | st.integers(T0 - 10, T0 + 300),
    )
    marks = tuple(draw(st.lists(mark_strategy, max_size=3)))
    now = draw(st.integers(T0 - 10, T0 + 300))
    ended = draw(st.none() | st.integers(T0, T0 + 250))
    return Call(events, marks, now, draw(st.sampled_from([0, 60, 7200])), ended)


T = TypeVar("T")


def scrambled(data: st.DataObject, items: tuple[T, ...]) -> tuple[T, ...]:
    """Any order, with any items repeated."""
    repeats = data.draw(st.lists(st.sampled_from(items), max_size=6)) if items else []
    return tuple(data.draw(st.permutations([*items, *repeats])))


@settings(max_examples=150, deadline=None)
@given(call=realistic_calls() | arbitrary_calls(), data=st.data())
def test_any_arrival_order_with_repeats_gives_the_ordered_result(
    call: Call, data: st.DataObject
) -> None:
    ordered = call.build()
    events = scrambled(data, call.events)
    research = scrambled(data, call.research)
    assert call.build(events, research) == ordered


def assert_sorted_disjoint(intervals: tuple[Interval, ...]) -> None:
    assert all(i.seconds > 0 for i in intervals)
    assert all(a.end_seconds < b.start_seconds for a, b in pairwise(intervals))


@settings(max_examples=150, deadline=None)
@given(call=realistic_calls() | arbitrary_calls())
def test_timeline_invariants_hold_for_any_call(call: Call) -> None:
    result = call.build()
    times = [e.at_seconds for e in call.events]
    lowest = min(times, default=call.now_seconds)
    highest = max([call.now_seconds, *times, call.call_ended_at_seconds or lowest])
    assert_sorted_disjoint(result.hold)
    for interval in result.hold:
        assert lowest <= interval.start_seconds
        assert interval.end_seconds <= highest
        if call.call_ended_at_seconds is not None:
            assert interval.end_seconds <= call.call_ended_at_seconds
    for agent in result.agents.values():
        for intervals in (agent.active, agent.research, agent.billable):
            assert_sorted_disjoint(intervals)
        assert agent.billable == union(agent.active + agent.research)
        assert max(agent.active_seconds, agent.research_seconds) <= agent.billable_seconds
        assert agent.billable_seconds <= agent.active_seconds + agent.research_seconds
        assert intersection(agent.active, result.hold) == ()
        for interval in agent.active:
            assert lowest <= interval.start_seconds
            assert interval.end_seconds <= highest
            if call.call_ended_at_seconds is not None:
                assert interval.end_seconds <= call.call_ended_at_seconds
        for interval in agent.research:
            assert interval.seconds <= call.research_max_seconds or len(call.research) > 1
            assert interval.end_seconds <= max(
                [call.now_seconds, *(m.end_seconds or 0 for m in call.research)]
            )
    assert set(result.unlabelled_agents) <= set(result.agents)
    assert list(result.entries) == sorted(result.entries, key=lambda e: e.at_seconds)
