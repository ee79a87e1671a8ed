"""A call's time, from its recorded conference events and research marks (docs/billing.md, Time).

One pure function, `build_timeline`, turns what Twilio told us about a conference (and what agents
flagged as research) into, per agent, active / research / billable intervals, and the customer's
hold intervals. No I/O, no clock: the caller passes `now_seconds`. All times are integer seconds
since the Unix epoch; every interval is half-open `[start_seconds, end_seconds)`.

The result depends only on the *set* of events and marks: any arrival order, with any repeats,
gives the same `Timeline`. Decisions taken where docs/billing.md is silent:

- Events are de-duplicated by equality and applied in order of (sequence_number, at_seconds), ties
  broken by the remaining fields, so two *different* events that share a sequence number are both
  applied, in a fixed order.
- Time never runs backwards: an event stamped earlier than one before it in sequence order takes
  effect at the earlier one's time, so no interval is negative.
- A participant's label is the first non-empty label on any of its events, in sequence order.
  `agent:<id>` (non-empty id) names agent `<id>`; the label equal to `customer_label` is the
  customer; every other participant is an agent named by its CallSid and is listed in
  `unlabelled_agents`. Several legs with the same label are one person (a re-dialled agent, or a
  re-joined customer): their times are united.
- Only conference-start/-end and participant-join/-leave/-hold/-unhold/-modify are read; other kinds
  (mute, speech, announcement) are ignored, Hold field included. A hold/unhold event means what its
  kind says; on join and modify the Hold field, when sent, sets the hold state (join without it:
  not on hold). An event for a participant not in the conference, other than a join, changes
  nothing (no join on record: no time is counted). A join while already in only updates the hold.
- conference-end takes everyone out. `call_ended_at_seconds` cuts the customer's presence there
  (whatever the events say afterwards); open legs then close at that time, else at `now_seconds`.
- Research marks are de-duplicated, each clipped to `research_max_seconds` (closed marks too), an
  open one ends at min(now, start + limit); a mark ending before it starts counts nothing. Research
  is not cut by the call's end or the customer's hold. An agent with research but no conference
  leg is still listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meterd.core.intervals import Interval, difference, intersection, total_seconds, union
from meterd.core.money import ceil_div

__all__ = [
    "AGENT_LABEL_PREFIX",
    "AgentTime",
    "ConferenceEvent",
    "ConferenceReplay",
    "Interval",
    "ResearchMark",
    "Timeline",
    "TimelineEntry",
    "agent_minutes",
    "build_timeline",
    "ceil_div",
    "difference",
    "event_order_key",
    "intersection",
    "timeline_of_replay",
    "union",
]

AGENT_LABEL_PREFIX = "agent:"

CONFERENCE_START = "conference-start"
CONFERENCE_END = "conference-end"
PARTICIPANT_JOIN = "participant-join"
PARTICIPANT_LEAVE = "participant-leave"
PARTICIPANT_HOLD = "participant-hold"
PARTICIPANT_UNHOLD = "participant-unhold"
PARTICIPANT_MODIFY = "participant-modify"
_PARTICIPANT_KINDS = frozenset(
    {PARTICIPANT_JOIN, PARTICIPANT_LEAVE, PARTICIPANT_HOLD, PARTICIPANT_UNHOLD, PARTICIPANT_MODIFY}
)


# --- input -------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ConferenceEvent:
    """One conference status callback, as recorded."""

    sequence_number: int  # Twilio's SequenceNumber, per conference
    at_seconds: int  # Twilio's Timestamp, epoch seconds
    kind: str  # StatusCallbackEvent, e.g. "participant-join"
    call_sid: str = ""  # the participant's CallSid ("" for conference-start/end)
    label: str = ""  # ParticipantLabel ("" if none)
    hold: bool | None = None  # the Hold field, if sent


@dataclass(frozen=True)
class ResearchMark:
    """An interval agent `agent_id` flagged as research on this call."""

    agent_id: str
    start_seconds: int
    end_seconds: int | None  # None = still open


def agent_minutes(billable_seconds: int, increment_seconds: int) -> int:
    """Whole agent-minutes for one agent on one call, rounded up (docs/billing.md, Minutes)."""
    return ceil_div(billable_seconds, increment_seconds)


# --- output ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentTime:
    """One agent's time on one call; each tuple sorted, disjoint, non-empty."""

    active: tuple[Interval, ...]
    research: tuple[Interval, ...]
    billable: tuple[Interval, ...]  # union(active, research)
    # Billable time is still running at `now_seconds`: the agent is active with the customer
    # (both in, neither held) or has research open below its limit. Kept apart from the
    # intervals, which may be empty at that very second (a join stamped `now`, or later).
    accruing: bool = False

    @property
    def active_seconds(self) -> int:
        return total_seconds(self.active)

    @property
    def research_seconds(self) -> int:
        return total_seconds(self.research)

    @property
    def billable_seconds(self) -> int:
        return total_seconds(self.billable)


@dataclass(frozen=True, order=True)
class TimelineEntry:
    """One line of the call view, e.g. (1700000010, "agent:alice joined")."""

    at_seconds: int
    text: str


@dataclass(frozen=True)
class Timeline:
    """What a call's time was, by the rules of docs/billing.md."""

    hold: tuple[Interval, ...]  # customer in the conference, no agent active with them
    agents: Mapping[str, AgentTime] = field(hash=False)  # by agent id, sorted
    unlabelled_agents: tuple[str, ...]  # CallSids of agents without an `agent:<id>` label
    entries: tuple[TimelineEntry, ...]  # for a person reading the call, in time order

    @property
    def hold_seconds(self) -> int:
        return total_seconds(self.hold)

    @property
    def billable_union(self) -> tuple[Interval, ...]:
        """Time at least one agent was billable (per_incident counts this once)."""
        return union(i for agent in self.agents.values() for i in agent.billable)

    @property
    def billable_union_seconds(self) -> int:
        return total_seconds(self.billable_union)


# --- the state machine -------------------------------------------------------------------------


@dataclass
class _Leg:
    """One participant (CallSid) while the events are replayed."""

    name: str
    in_conference: bool = False
    held: bool = False
    since_seconds: int = 0
    present: list[Interval] = field(default_factory=list)  # in, on hold or not
    available: list[Interval] = field(default_factory=list)  # in and not on hold

    def move(self, at_seconds: int, *, in_conference: bool, held: bool) -> None:
        if self.in_conference:
            end_seconds = max(at_seconds, self.since_seconds)
            self.present.append(Interval(self.since_seconds, end_seconds))
            if not self.held:
                self.available.append(Interval(self.since_seconds, end_seconds))
        self.in_conference, self.held, self.since_seconds = in_conference, held, at_seconds

    @property
    def available_now(self) -> bool:
        return self.in_conference and not self.held

    def closed(self, at_seconds: int) -> tuple[list[Interval], list[Interval]]:
        """Its present and available time, a stay still open closed at `at_seconds` (never
        before it began); the leg itself is left as it is."""
        if not self.in_conference:
            return self.present, self.available
        tail = Interval(self.since_seconds, max(at_seconds, self.since_seconds))
        return [*self.present, tail], self.available if self.held else [*self.available, tail]


def event_order_key(event: ConferenceEvent) -> tuple[int, int, str, str, str, int]:
    hold_rank = -1 if event.hold is None else int(event.hold)
    return (
        event.sequence_number,
        event.at_seconds,
        event.kind,
        event.call_sid,
        event.label,
        hold_rank,
    )


def _mark_key(mark: ResearchMark) -> tuple[str, int, bool, int]:
    end = mark.end_seconds
    return (mark.agent_id, mark.start_seconds, end is None, 0 if end is None else end)


def _labels(events: Iterable[ConferenceEvent]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for event in events:
        if event.call_sid and event.label and event.call_sid not in labels:
            labels[event.call_sid] = event.label
    return labels


def _agent_id(label: str) -> str | None:
    if label.startswith(AGENT_LABEL_PREFIX) and len(label) > len(AGENT_LABEL_PREFIX):
        return label[len(AGENT_LABEL_PREFIX) :]
    return None


def _clip_end(intervals: Iterable[Interval], end_seconds: int) -> tuple[Interval, ...]:
    return union(
        Interval(i.start_seconds, min(i.end_seconds, end_seconds))
        for i in intervals
        if i.start_seconds < end_seconds
    )


def _is_read(event: ConferenceEvent) -> bool:
    """Conference start/end, and the participant events that name a participant."""
    if event.kind in (CONFERENCE_START, CONFERENCE_END):
        return True
    return event.kind in _PARTICIPANT_KINDS and bool(event.call_sid)


@dataclass
class ConferenceReplay:
    """The conference while its events are replayed in order: every participant's leg, who each
    one is (the customer, or which agent), and the lines of the call view. `apply` only appends
    to the legs' intervals and to `entries` (meterd/core/timeline_incremental.py rewinds it)."""

    labels: Mapping[str, str]  # call_sid -> the participant's label
    customer_label: str
    customer_call_sid: str
    legs: dict[str, _Leg] = field(default_factory=dict)
    leg_agent: dict[str, str] = field(default_factory=dict)  # call_sid -> agent id (not customer)
    unlabelled: set[str] = field(default_factory=set)
    entries: list[TimelineEntry] = field(default_factory=list)
    clock_seconds: int | None = None  # the time of the last event read

    def replay(self, ordered: Iterable[ConferenceEvent]) -> None:
        for event in ordered:
            self.apply(event)

    def apply(self, event: ConferenceEvent) -> None:
        """Apply the next event in order; time never runs backwards (see the module's docstring)."""
        if not _is_read(event):
            return
        clock_seconds = self.clock_seconds
        at = event.at_seconds if clock_seconds is None else max(clock_seconds, event.at_seconds)
        self.clock_seconds = at
        if event.kind == CONFERENCE_START:
            self.entries.append(TimelineEntry(at, "conference started"))
        elif event.kind == CONFERENCE_END:
            for leg in self.legs.values():
                if leg.in_conference:
                    leg.move(at, in_conference=False, held=False)
            self.entries.append(TimelineEntry(at, "conference ended"))
        else:
            self._participant_event(event, at)

    def _participant_event(self, event: ConferenceEvent, at: int) -> None:
        leg = self._leg(event.call_sid)
        if event.kind == PARTICIPANT_JOIN:
            held = bool(event.hold)
            if not leg.in_conference:
                text = f"{leg.name} joined on hold" if held else f"{leg.name} joined"
                self.entries.append(TimelineEntry(at, text))
                leg.move(at, in_conference=True, held=held)
            else:
                self._set_hold(leg, at, held)
        elif not leg.in_conference:
            return  # no join on record: nothing to count
        elif event.kind == PARTICIPANT_LEAVE:
            self.entries.append(TimelineEntry(at, f"{leg.name} left"))
            leg.move(at, in_conference=False, held=False)
        elif event.kind == PARTICIPANT_HOLD:
            self._set_hold(leg, at, True)
        elif event.kind == PARTICIPANT_UNHOLD:
            self._set_hold(leg, at, False)
        else:
            self._set_hold(leg, at, leg.held if event.hold is None else event.hold)

    def _set_hold(self, leg: _Leg, at: int, held: bool) -> None:
        if held != leg.held:
            text = f"{leg.name} put on hold" if held else f"{leg.name} taken off hold"
            self.entries.append(TimelineEntry(at, text))
            leg.move(at, in_conference=True, held=held)

    def _leg(self, call_sid: str) -> _Leg:
        """The participant's leg, made on its first event: the customer, or an agent."""
        leg = self.legs.get(call_sid)
        if leg is None:
            label = self.labels.get(call_sid, "")
            customer_sid = self.customer_call_sid
            if label == self.customer_label or (customer_sid and call_sid == customer_sid):
                name = "customer"
            else:
                agent_id = _agent_id(label)
                if agent_id is None:
                    agent_id = call_sid
                    self.unlabelled.add(call_sid)
                    name = f"unlabelled participant {call_sid}"
                else:
                    name = label
                self.leg_agent[call_sid] = agent_id
            leg = self.legs[call_sid] = _Leg(name)
        return leg

    def customer_legs(self) -> list[_Leg]:
        return [leg for sid, leg in self.legs.items() if sid not in self.leg_agent]

    def agents_available_now(self) -> set[str]:
        """The agents in the conference and not on hold, as the events leave it."""
        return {
            agent_id for sid, agent_id in self.leg_agent.items() if self.legs[sid].available_now
        }

    def agent_available(self, open_until_seconds: int) -> dict[str, list[Interval]]:
        """Per agent, the time any of its legs was in and not on hold, open legs closed at
        `open_until_seconds`."""
        available: dict[str, list[Interval]] = {}
        for call_sid, agent_id in self.leg_agent.items():
            _, leg_available = self.legs[call_sid].closed(open_until_seconds)
            available.setdefault(agent_id, []).extend(leg_available)
        return available


@dataclass
class _Research:
    """The research marks, clipped to the limit: per agent its intervals, and who is still
    researching (an open mark below its limit)."""

    by_agent: dict[str, list[Interval]] = field(default_factory=dict)
    researching_now: set[str] = field(default_factory=set)


def _research(
    marks: Iterable[ResearchMark],
    *,
    research_max_seconds: int,
    research_now_seconds: int,
    entries: list[TimelineEntry],
) -> _Research:
    """Each mark de-duplicated and clipped to `research_max_seconds`, an open one closed at
    `research_now_seconds`; its lines go to `entries`."""
    research = _Research()
    for mark in sorted(set(marks), key=_mark_key):
        research.by_agent.setdefault(mark.agent_id, [])
        name = f"{AGENT_LABEL_PREFIX}{mark.agent_id}"
        limit_seconds = mark.start_seconds + research_max_seconds
        if mark.end_seconds is None:
            if research_now_seconds < limit_seconds:
                research.researching_now.add(mark.agent_id)
            end_seconds = min(research_now_seconds, limit_seconds)
        else:
            end_seconds = min(mark.end_seconds, limit_seconds)
        if end_seconds <= mark.start_seconds:
            continue
        research.by_agent[mark.agent_id].append(Interval(mark.start_seconds, end_seconds))
        entries.append(TimelineEntry(mark.start_seconds, f"{name} research started"))
        if end_seconds == limit_seconds and mark.end_seconds != limit_seconds:
            text = f"{name} research closed at the {research_max_seconds} s limit"
            entries.append(TimelineEntry(end_seconds, text))
        elif mark.end_seconds is not None:
            entries.append(TimelineEntry(end_seconds, f"{name} research stopped"))
    return research


def _agent_times(
    customer_available: tuple[Interval, ...],
    agent_available: Mapping[str, list[Interval]],
    research: _Research,
    active_now: set[str],
) -> dict[str, AgentTime]:
    """Per agent (sorted): active is its available time while the customer's is; billable adds
    its research. `active_now`: the agents active with the customer at `now_seconds`."""
    agents: dict[str, AgentTime] = {}
    for agent_id in sorted(agent_available.keys() | research.by_agent.keys()):
        active = intersection(customer_available, agent_available.get(agent_id, ()))
        research_time = union(research.by_agent.get(agent_id, ()))
        agents[agent_id] = AgentTime(
            active=active,
            research=research_time,
            billable=union(active + research_time),
            accruing=agent_id in research.researching_now or agent_id in active_now,
        )
    return agents


def build_timeline(
    events: Iterable[ConferenceEvent],
    research: Iterable[ResearchMark],
    *,
    now_seconds: int,
    research_max_seconds: int,
    call_ended_at_seconds: int | None = None,
    customer_label: str = "customer",
    customer_call_sid: str = "",
    research_now_seconds: int | None = None,
) -> Timeline:
    """Per-agent active / research / billable time and the customer's hold time of one call.

    `now_seconds` closes what is still open (a live call); `call_ended_at_seconds`, once the
    customer's call has ended, closes the customer's presence at that time. The customer is
    the participant labelled `customer_label`, or whose CallSid is `customer_call_sid` (the
    call's own sid: meterd put that leg in the conference), label or not.
    `research_now_seconds` closes open research marks when their clock (meterd's: agents flag
    research through meterd) differs from the events' (Twilio's); default `now_seconds`.
    """
    if not customer_label:
        raise ValueError("customer_label must not be empty")
    ordered = sorted(set(events), key=event_order_key)
    conference = ConferenceReplay(_labels(ordered), customer_label, customer_call_sid)
    conference.replay(ordered)
    return timeline_of_replay(
        conference,
        research,
        now_seconds=now_seconds,
        research_max_seconds=research_max_seconds,
        call_ended_at_seconds=call_ended_at_seconds,
        research_now_seconds=research_now_seconds,
    )


def timeline_of_replay(
    conference: ConferenceReplay,
    research: Iterable[ResearchMark],
    *,
    now_seconds: int,
    research_max_seconds: int,
    call_ended_at_seconds: int | None,
    research_now_seconds: int | None,
) -> Timeline:
    """The timeline of a conference whose events are all replayed, as `build_timeline` (same
    arguments) gives it; `conference` is left as it is, so more events can still be applied."""
    if research_max_seconds < 0:
        raise ValueError(f"research_max_seconds must be >= 0, not {research_max_seconds}")

    # Who is active with the customer right now, before the open legs are closed.
    customer_available_now = call_ended_at_seconds is None and any(
        leg.available_now for leg in conference.customer_legs()
    )
    active_now = conference.agents_available_now() if customer_available_now else set()
    open_until = now_seconds if call_ended_at_seconds is None else call_ended_at_seconds

    customer_closed = [leg.closed(open_until) for leg in conference.customer_legs()]
    customer_present = union(i for present, _ in customer_closed for i in present)
    customer_available = union(i for _, available in customer_closed for i in available)
    entries = list(conference.entries)
    if call_ended_at_seconds is not None:
        customer_present = _clip_end(customer_present, call_ended_at_seconds)
        customer_available = _clip_end(customer_available, call_ended_at_seconds)
        entries.append(TimelineEntry(call_ended_at_seconds, "call ended"))

    research_time = _research(
        research,
        research_max_seconds=research_max_seconds,
        research_now_seconds=now_seconds if research_now_seconds is None else research_now_seconds,
        entries=entries,
    )
    agents = _agent_times(
        customer_available, conference.agent_available(open_until), research_time, active_now
    )
    all_active = union(i for agent in agents.values() for i in agent.active)

    entries.sort(key=lambda entry: entry.at_seconds)  # stable: same-second entries keep their order
    return Timeline(
        hold=difference(customer_present, all_active),
        agents=MappingProxyType(agents),
        unlabelled_agents=tuple(sorted(conference.unlabelled)),
        entries=tuple(entries),
    )
