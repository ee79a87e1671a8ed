"""A call's timeline kept up to date event by event, equal to the full rebuild at every step.

`TimelineState` holds one call's events, research marks and end, and the conference as those
events leave it (`ConferenceReplay`, the very state machine `build_timeline` runs). Its
`timeline_at(...)` returns exactly `build_timeline(every event so far, every mark so far, same
arguments)`: both finish through `timeline_of_replay`, so the state only has to keep the replay
equal to a fresh replay of the events in order. Pure: no I/O, no clock.

How it stays equal, whatever order the events arrive in and however often:

- The events are kept de-duplicated (by equality, as `build_timeline` does) and sorted by
  `event_order_key`; the replay has applied all of them, in that order.
- Applying an event only appends: to `entries`, to a leg's intervals, a new leg (and who it is),
  and moves the replay's clock and the touched legs' state. Before each event is applied, what it
  can change is noted (`_Undo`: the clock, the count of entries, each touched leg's state and
  interval counts, whether it made the leg), so it can be taken back exactly.
- An event later than every other one (the common case: Twilio sends them in order) is applied:
  no replay. An earlier one is inserted where it sorts; the events after it are taken back, newest
  first, and replayed after it. The cost is the number of events after it, not the call's.
- A leg's name and who it is (customer, agent) are fixed when the leg is made, from its label:
  the first non-empty label of its CallSid's events in order. An event that changes that label
  for a leg already made takes back everything from the event that made the leg, so the leg is
  made again under its new name.
- Research marks are few (one per flag): kept as a multiset (an open mark closed becomes its
  closed form) and clipped anew each time, as `build_timeline` does.

The result (its intervals and its lines) is still built at each `timeline_at`, in time linear in
the call's events; what the state saves is loading, sorting and replaying them all.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import NamedTuple

from meterd.core.timeline import (
    CONFERENCE_END,
    ConferenceEvent,
    ConferenceReplay,
    ResearchMark,
    Timeline,
    event_order_key,
    timeline_of_replay,
)

__all__ = ["TimelineState"]

_EventKey = tuple[int, int, str, str, str, int]


class _LegState(NamedTuple):
    """What applying an event may change of one leg: its state and its interval counts."""

    call_sid: str
    in_conference: bool
    held: bool
    since_seconds: int
    present_count: int
    available_count: int


class _Undo(NamedTuple):
    """What one applied event changed, to take it back."""

    clock_seconds: int | None
    entries_count: int
    legs: tuple[_LegState, ...]  # each leg the event could move, before it did
    made_leg: str | None  # the CallSid whose leg this event made


class TimelineState:
    """One call's timeline state: feed it events, marks and the call's end in any order, ask it
    for the timeline at any time. See the module's docstring for why it equals the rebuild."""

    def __init__(self, *, customer_call_sid: str = "", customer_label: str = "customer") -> None:
        if not customer_label:
            raise ValueError("customer_label must not be empty")
        self._customer_call_sid = customer_call_sid
        self._customer_label = customer_label
        self._events: list[ConferenceEvent] = []  # de-duplicated, in event_order_key order
        self._keys: list[_EventKey] = []  # event_order_key of each, for bisect
        self._undo: list[_Undo] = []  # one per applied event: all of them
        self._labels: dict[str, str] = {}  # CallSid -> its first non-empty label, in order
        self._label_keys: dict[str, _EventKey] = {}  # CallSid -> the key of the event giving it
        self._leg_made_at: dict[str, int] = {}  # CallSid -> index of the event that made its leg
        self._replay = ConferenceReplay(self._labels, customer_label, customer_call_sid)
        self._marks: Counter[ResearchMark] = Counter()
        self._call_ended_at_seconds: int | None = None
        self._latest_event_seconds: int | None = None

    @property
    def event_count(self) -> int:
        """Distinct events held."""
        return len(self._events)

    @property
    def latest_event_seconds(self) -> int | None:
        """The latest Twilio timestamp of any event held (None before the first)."""
        return self._latest_event_seconds

    def add_event(self, event: ConferenceEvent) -> bool:
        """Take one recorded conference event; False if it was already held (a duplicate)."""
        key = event_order_key(event)
        index = bisect_left(self._keys, key)
        if index < len(self._keys) and self._keys[index] == key:
            return False
        latest = self._latest_event_seconds
        self._latest_event_seconds = (
            event.at_seconds if latest is None else max(latest, event.at_seconds)
        )
        replay_from = index
        if self._relabels(event, key):
            made_at = self._leg_made_at.get(event.call_sid)
            if made_at is not None:
                replay_from = min(replay_from, made_at)
        self._rewind(replay_from)
        self._events.insert(index, event)
        self._keys.insert(index, key)
        for position in range(replay_from, len(self._events)):
            self._apply(position)
        return True

    def add_research(self, mark: ResearchMark) -> None:
        """Take one research mark, open (`end_seconds` None) or closed."""
        self._marks[mark] += 1

    def close_research(self, agent_id: str, start_seconds: int, end_seconds: int) -> None:
        """The open mark of `agent_id` that started at `start_seconds` now ends at `end_seconds`."""
        open_mark = ResearchMark(agent_id, start_seconds, None)
        if not self._marks[open_mark]:  # a Counter reads a missing key as 0, adding nothing
            raise ValueError(f"no open research mark to close: {open_mark}")
        self._marks[open_mark] -= 1
        if not self._marks[open_mark]:
            del self._marks[open_mark]
        self._marks[ResearchMark(agent_id, start_seconds, end_seconds)] += 1

    def set_call_ended(self, at_seconds: int | None) -> None:
        """The customer's call ended at `at_seconds` (None: not ended)."""
        self._call_ended_at_seconds = at_seconds

    def timeline_at(
        self,
        *,
        now_seconds: int,
        research_max_seconds: int,
        research_now_seconds: int | None = None,
    ) -> Timeline:
        """`build_timeline` of everything held, with these arguments."""
        return timeline_of_replay(
            self._replay,
            self._marks,
            now_seconds=now_seconds,
            research_max_seconds=research_max_seconds,
            call_ended_at_seconds=self._call_ended_at_seconds,
            research_now_seconds=research_now_seconds,
        )

    def _relabels(self, event: ConferenceEvent, key: _EventKey) -> bool:
        """Record `event`'s label if it is now its CallSid's first; True if the label changed."""
        call_sid = event.call_sid
        if not (call_sid and event.label):
            return False
        known_key = self._label_keys.get(call_sid)
        if known_key is not None and known_key < key:
            return False
        self._label_keys[call_sid] = key
        changed = self._labels.get(call_sid) != event.label
        self._labels[call_sid] = event.label
        return changed

    def _apply(self, position: int) -> None:
        """Apply the event at `position` (every one before it applied), noting how to undo it."""
        event = self._events[position]
        replay = self._replay
        if event.kind == CONFERENCE_END:
            touched = tuple(replay.legs)
        else:
            touched = (event.call_sid,) if event.call_sid in replay.legs else ()
        legs = tuple(
            _LegState(
                sid,
                replay.legs[sid].in_conference,
                replay.legs[sid].held,
                replay.legs[sid].since_seconds,
                len(replay.legs[sid].present),
                len(replay.legs[sid].available),
            )
            for sid in touched
        )
        undo = _Undo(replay.clock_seconds, len(replay.entries), legs, None)
        legs_before = len(replay.legs)
        replay.apply(event)
        if len(replay.legs) != legs_before:  # only the event's own leg is ever made
            undo = undo._replace(made_leg=event.call_sid)
            self._leg_made_at[event.call_sid] = position
        self._undo.append(undo)

    def _rewind(self, position: int) -> None:
        """Take back every applied event from `position` on, the newest first."""
        replay = self._replay
        while len(self._undo) > position:
            undo = self._undo.pop()
            del replay.entries[undo.entries_count :]
            replay.clock_seconds = undo.clock_seconds
            for state in undo.legs:
                leg = replay.legs[state.call_sid]
                leg.in_conference, leg.held = state.in_conference, state.held
                leg.since_seconds = state.since_seconds
                del leg.present[state.present_count :]
                del leg.available[state.available_count :]
            if undo.made_leg is not None:
                del replay.legs[undo.made_leg]
                replay.leg_agent.pop(undo.made_leg, None)
                replay.unlabelled.discard(undo.made_leg)
                del self._leg_made_at[undo.made_leg]
