"""meterd.core.timeline_incremental: the state, fed one thing at a time in any order, equals the
full rebuild (`build_timeline` of all that has arrived) after every step (issue 15, acceptance 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterd.core.timeline import (
    ConferenceEvent,
    ConferenceReplay,
    ResearchMark,
    build_timeline,
    event_order_key,
)
from meterd.core.timeline_incremental import TimelineState
from tests.unit.test_timeline import CUSTOMER, T0, Call, arbitrary_calls, realistic_calls

ALICE = "CAalice"
# The participant events meterd reads first, then the rest.
KINDS = (
    *(f"participant-{verb}" for verb in ("join", "leave", "hold", "unhold", "modify")),
    *("participant-mute", "conference-start", "conference-end"),
)


@st.composite
def busy_calls(draw: st.DrawFn) -> Call:
    """A customer and up to three agent legs (two may be one agent re-dialled) doing anything in
    any state, a conference that may end and go on, labels sent on some events only and
    sometimes changing, shared sequence numbers and timestamps that step back."""
    legs = [(CUSTOMER, ("customer", ""))]
    for n in range(draw(st.integers(1, 3))):
        agent = draw(st.sampled_from([f"a{n}", "a0"]))
        legs.append((f"CAleg{n}", (f"agent:{agent}", "", "", f"agent:{agent}x")))
    step = st.tuples(
        st.sampled_from(range(len(legs))),
        st.sampled_from(KINDS[:5]) | st.sampled_from(KINDS),
        st.integers(-5, 40),
        st.integers(0, 3),  # 0: the event shares the last one's sequence number
        st.none() | st.booleans(),
    )
    events: list[ConferenceEvent] = []
    sequence_number, at = 0, T0 + draw(st.integers(0, 100))
    steps = draw(st.lists(step, min_size=8, max_size=30))
    for leg, kind, step_seconds, label_choice, hold in steps:
        call_sid, labels = legs[leg]
        sequence_number += min(label_choice, 1)
        at += step_seconds
        if kind.startswith("conference"):
            events.append(ConferenceEvent(sequence_number, at, kind))
        else:
            label = labels[label_choice % len(labels)]
            events.append(ConferenceEvent(sequence_number, at, kind, call_sid, label, hold))
    end = at + draw(st.integers(0, 40))
    mark = st.builds(
        ResearchMark,
        st.sampled_from(["a0", "a1", "CAleg0"]),
        st.integers(T0 - 20, end + 20),
        st.none() | st.integers(T0 - 20, end + 400),
    )
    return Call(
        tuple(events),
        tuple(draw(st.lists(mark, max_size=4))),
        end + draw(st.integers(-20, 300)),
        draw(st.sampled_from([0, 30, 7200])),
        draw(st.none() | st.integers(T0, end + 20)),
    )


@dataclass(frozen=True)
class Query:
    now_seconds: int
    research_now_seconds: int | None
    research_max_seconds: int


# One arrival: ("event", event), ("mark", index into the call's marks: its first arrival adds it,
# open if it is to be closed later, its second closes it) or ("ended", None).
Arrival = tuple[str, object]


@dataclass(frozen=True)
class Delivery:
    call: Call
    customer_call_sid: str
    arrivals: tuple[Arrival, ...]
    queries: tuple[Query, ...]
    closed_later: frozenset[int]  # marks that arrive open and are closed by a second arrival


def _nearly_in_order(data: st.DataObject, items: list[Arrival]) -> list[Arrival]:
    """Twilio's usual order: a few arrivals moved a few places later."""
    for _ in range(data.draw(st.integers(1, 4))):
        if len(items) > 1:
            i = data.draw(st.integers(0, len(items) - 2))
            j = min(len(items) - 1, i + data.draw(st.integers(1, 4)))
            items.insert(j, items.pop(i))
    return items


@st.composite
def deliveries(draw: st.DrawFn) -> Delivery:
    """A call's events (repeats included), research marks (some arriving open, closed later) and
    its end, arriving in order, nearly in order, or shuffled; and the times it is asked about."""
    call = draw(busy_calls() | busy_calls() | realistic_calls() | arbitrary_calls())
    data = draw(st.data())
    events = list(call.events)
    repeats = data.draw(st.lists(st.sampled_from(events), max_size=5)) if events else []
    arrivals: list[Arrival] = [("event", e) for e in sorted(events + repeats, key=event_order_key)]
    closed_later = frozenset(
        i
        for i, mark in enumerate(call.research)
        if mark.end_seconds is not None and data.draw(st.booleans())
    )
    arrivals += [("mark", i) for i in range(len(call.research))]
    arrivals += [("mark", i) for i in sorted(closed_later)]
    if call.call_ended_at_seconds is not None:
        arrivals.append(("ended", None))
    orders = ["in order", "nearly in order", "nearly in order", "shuffled", "shuffled"]
    order = data.draw(st.sampled_from(orders))
    if order == "nearly in order":
        arrivals = _nearly_in_order(data, arrivals)
    elif order == "shuffled":
        arrivals = list(data.draw(st.permutations(arrivals)))
    query = st.builds(
        Query,
        st.just(call.now_seconds) | st.integers(T0 - 10, T0 + 1500),
        st.none() | st.integers(T0 - 10, T0 + 1500),
        st.just(call.research_max_seconds) | st.sampled_from([0, 45, 7200]),
    )
    queries = tuple(data.draw(st.lists(query, min_size=1, max_size=2)))
    customer_call_sid = draw(st.sampled_from(["", CUSTOMER, ALICE]))
    return Delivery(call, customer_call_sid, tuple(arrivals), queries, closed_later)


Step = tuple[TimelineState, list[ConferenceEvent], list[ResearchMark], int | None]


def _deliver(delivery: Delivery) -> Iterator[Step]:
    """Feed the state one arrival at a time; yield it with what has arrived so far (events,
    marks as they stand, the call's end)."""
    call = delivery.call
    state = TimelineState(customer_call_sid=delivery.customer_call_sid)
    events: list[ConferenceEvent] = []
    marks: list[ResearchMark] = []
    seen_marks: set[int] = set()
    ended: int | None = None
    for kind, item in delivery.arrivals:
        if kind == "event":
            assert isinstance(item, ConferenceEvent)
            assert state.add_event(item) == (item not in events)
            events.append(item)
        elif kind == "mark":
            assert isinstance(item, int)
            mark = call.research[item]
            if item not in seen_marks:
                seen_marks.add(item)
                if item in delivery.closed_later:
                    mark = ResearchMark(mark.agent_id, mark.start_seconds, None)
                state.add_research(mark)
                marks.append(mark)
            else:
                assert mark.end_seconds is not None
                state.close_research(mark.agent_id, mark.start_seconds, mark.end_seconds)
                marks[marks.index(ResearchMark(mark.agent_id, mark.start_seconds, None))] = mark
        else:
            ended = call.call_ended_at_seconds
            state.set_call_ended(ended)
        yield state, events, marks, ended


@settings(max_examples=500, deadline=None)
@given(delivery=deliveries())
def test_incremental_timeline_equals_the_full_rebuild_after_every_arrival(
    delivery: Delivery,
) -> None:
    steps = 0
    for state, events, marks, ended in _deliver(delivery):
        steps += 1
        for query in delivery.queries:
            rebuilt = build_timeline(
                events,
                marks,
                now_seconds=query.now_seconds,
                research_now_seconds=query.research_now_seconds,
                research_max_seconds=query.research_max_seconds,
                call_ended_at_seconds=ended,
                customer_call_sid=delivery.customer_call_sid,
            )
            incremental = state.timeline_at(
                now_seconds=query.now_seconds,
                research_now_seconds=query.research_now_seconds,
                research_max_seconds=query.research_max_seconds,
            )
            assert incremental == rebuilt, f"after arrival {steps}"
        assert state.event_count == len(set(events))
        assert state.latest_event_seconds == max((e.at_seconds for e in events), default=None)
    assert steps == len(delivery.arrivals)


# --- the cost, and the small contracts ---------------------------------------------------------


@contextmanager
def counted_applies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ConferenceEvent]]:
    """Every event ConferenceReplay.apply is given while the block runs."""
    applied: list[ConferenceEvent] = []
    apply = ConferenceReplay.apply

    def counting(self: ConferenceReplay, event: ConferenceEvent) -> None:
        applied.append(event)
        apply(self, event)

    with monkeypatch.context() as patch:
        patch.setattr(ConferenceReplay, "apply", counting)
        yield applied


def _joins_and_holds(count: int) -> list[ConferenceEvent]:
    events = [
        ConferenceEvent(0, T0, "participant-join", CUSTOMER, "customer"),
        ConferenceEvent(1, T0, "participant-join", ALICE, "agent:alice"),
    ]
    for n in range(2, count):
        kind = "participant-hold" if n % 2 else "participant-unhold"
        events.append(ConferenceEvent(n, T0 + n, kind, CUSTOMER, "customer", n % 2 == 1))
    return events


def test_events_arriving_in_order_are_each_applied_once(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _joins_and_holds(50)
    state = TimelineState(customer_call_sid=CUSTOMER)
    with counted_applies(monkeypatch) as applied:
        for event in events:
            state.add_event(event)
        assert not state.add_event(events[10])  # a repeat applies nothing
    assert applied == events


def test_a_late_event_replays_only_the_events_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _joins_and_holds(50)
    late = events.pop(46)
    state = TimelineState(customer_call_sid=CUSTOMER)
    for event in events:
        state.add_event(event)
    with counted_applies(monkeypatch) as applied:
        state.add_event(late)
    assert applied == [late, *events[46:]]


def test_a_label_arriving_late_names_the_leg_from_its_first_event() -> None:
    state = TimelineState(customer_call_sid=CUSTOMER)
    state.add_event(ConferenceEvent(0, T0, "participant-join", CUSTOMER))
    state.add_event(ConferenceEvent(1, T0 + 5, "participant-join", ALICE))
    assert state.timeline_at(now_seconds=T0 + 60, research_max_seconds=7200).unlabelled_agents
    state.add_event(ConferenceEvent(2, T0 + 30, "participant-modify", ALICE, "agent:alice"))
    timeline = state.timeline_at(now_seconds=T0 + 60, research_max_seconds=7200)
    assert timeline.unlabelled_agents == ()
    assert timeline.agents["alice"].active_seconds == 55
    assert "agent:alice joined" in {entry.text for entry in timeline.entries}


def test_closing_a_mark_that_is_not_open_is_refused() -> None:
    state = TimelineState()
    state.add_research(ResearchMark("alice", T0, T0 + 10))
    with pytest.raises(ValueError, match="no open research mark"):
        state.close_research("alice", T0, T0 + 20)
    with pytest.raises(ValueError, match="customer_label"):
        TimelineState(customer_label="")


def test_a_call_end_can_be_taken_back() -> None:
    state = TimelineState(customer_call_sid=CUSTOMER)
    state.add_event(ConferenceEvent(0, T0, "participant-join", CUSTOMER))
    live = state.timeline_at(now_seconds=T0 + 60, research_max_seconds=7200)
    state.set_call_ended(T0 + 10)
    assert state.timeline_at(now_seconds=T0 + 60, research_max_seconds=7200).hold_seconds == 10
    state.set_call_ended(None)
    assert state.timeline_at(now_seconds=T0 + 60, research_max_seconds=7200) == live
