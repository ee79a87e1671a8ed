"""The scenario: the run's accounts as the simulator sees them, and every call's plan (legs,
holds, research, waivers), drawn from the seed alone."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

WITHHELD_NUMBER = "+266696687"  # what Twilio sends as From for an anonymous caller
AGENT_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")


@dataclass
class SimAccount:
    kind: str  # bank, deposit, mixed, agreement, incident
    account_id: str
    plan: str
    numbers: list[str]
    pin: str = ""
    currency: str = "USD"
    initial_bank: int = 0
    initial_deposit: int = 0


@dataclass
class Leg:
    """One participant leg in the conference; offsets in seconds from the call's start."""

    who: str  # "customer" or an agent id
    sid: str
    join: int
    leave: int
    holds: list[tuple[int, int | None]] = field(default_factory=list)  # None: held until leave

    @property
    def label(self) -> str:
        return "customer" if self.who == "customer" else f"agent:{self.who}"

    def available(self, t: int) -> bool:
        """In the conference and not on hold during second [t, t+1)."""
        if not self.join <= t < self.leave:
            return False
        return not any(s <= t < (self.leave if e is None else e) for s, e in self.holds)


@dataclass
class Research:
    agent: str
    start: int  # offsets from the call's start (filled from meterd's answer for start/stop)
    end: int


@dataclass
class PlannedCall:
    index: int
    call_sid: str
    conference_sid: str
    account: SimAccount
    kind: str  # connected, menu_pin (hung up at the PIN prompt), menu_early (before the conference)
    from_number: str
    end: int  # when the caller hung up (offset)
    pin_entry: bool = False
    wrong_pin_first: bool = False
    legs: list[Leg] = field(default_factory=list)
    research: list[Research] = field(default_factory=list)
    research_after_hang_up: str = ""  # agent id: start/stop after the caller hung up
    waive: str = ""  # "", "during" or "after" (settlement)
    base: int = 0  # epoch second of offset 0 (set when the call is placed)
    finished: bool = False  # every request of the call was sent
    aborted: bool = False  # meterd's answer stopped the call early (see problems)
    waived_after: bool = False
    problems: list[str] = field(default_factory=list)  # requests meterd refused or failed
    observed: dict[str, Any] | None = None

    def describe(self) -> str:
        parts = [f"{self.kind}, account {self.account.kind}, hung up at {self.end}s"]
        for leg in self.legs:
            holds = ",".join(f"{s}-{'leave' if e is None else e}" for s, e in leg.holds)
            parts.append(
                f"{leg.label} {leg.join}-{leg.leave}" + (f" hold {holds}" if holds else "")
            )
        parts += [f"research {r.agent} {r.start}-{r.end}" for r in self.research]
        if self.waive:
            parts.append(f"waived {self.waive}")
        return "; ".join(parts)


def plan_calls(
    rng: random.Random,
    accounts: Mapping[str, SimAccount],
    *,
    calls: int,
    agents_max: int,
    max_call_seconds: int,
    nonce: int,
) -> list[PlannedCall]:
    """The scenario of every call, from the seed alone (SIDs also carry the run's nonce)."""
    weights = {"bank": 30, "deposit": 20, "mixed": 15, "agreement": 15, "incident": 20}
    kinds = list(weights)
    planned = []
    for index in range(calls):
        account = accounts[rng.choices(kinds, [weights[k] for k in kinds])[0]]
        call_sid = f"CA{nonce:08x}{index:016x}{0:08x}"
        call = PlannedCall(
            index=index,
            call_sid=call_sid,
            conference_sid=f"CF{nonce:08x}{index:016x}{0:08x}",
            account=account,
            kind="connected",
            from_number=rng.choice(account.numbers),
            end=0,
        )
        roll = rng.random()
        if roll < 0.04:
            call.kind, call.from_number, call.end = "menu_pin", WITHHELD_NUMBER, rng.randint(4, 25)
        elif roll < 0.08:
            call.kind, call.end = "menu_early", rng.randint(2, 10)
        else:
            if rng.random() < 0.12:
                call.pin_entry, call.from_number = True, WITHHELD_NUMBER
                call.wrong_pin_first = rng.random() < 0.3
            _plan_conference(rng, call, agents_max, max_call_seconds)
        planned.append(call)
    return planned


def _hold_inside(rng: random.Random, start: int, end: int) -> tuple[int, int | None] | None:
    if end - start < 4:
        return None
    s = rng.randint(start + 1, end - 2)
    if rng.random() < 0.15:
        return (s, None)  # still on hold when the leg leaves
    return (s, rng.randint(s + 1, end - 1))


def _plan_conference(
    rng: random.Random, call: PlannedCall, agents_max: int, max_call_seconds: int
) -> None:
    end = rng.randint(45, max(45, max_call_seconds))
    call.end = end
    leg_number = 0

    def leg_sid() -> str:
        nonlocal leg_number
        leg_number += 1
        return f"{call.call_sid[:-8]}{leg_number:08x}"

    customer = Leg("customer", call.call_sid, 0, end)
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        hold = _hold_inside(rng, 0, end)
        if hold and not any(_overlap(hold, h, end) for h in customer.holds):
            customer.holds.append(hold)
    call.legs.append(customer)
    agents = rng.sample(AGENT_NAMES, rng.randint(1, min(agents_max, len(AGENT_NAMES))))
    for agent in agents:
        join = rng.randint(1, max(1, int(end * 0.6)))
        leave = end if rng.random() < 0.5 else rng.randint(join + 1, end)
        leg = Leg(agent, leg_sid(), join, leave)
        if rng.random() < 0.25 and (hold := _hold_inside(rng, join, leave)):
            leg.holds.append(hold)
        call.legs.append(leg)
        if leave < end - 10 and rng.random() < 0.15:  # dropped, and dialled back in
            rejoin = rng.randint(leave + 1, end - 5)
            call.legs.append(Leg(agent, leg_sid(), rejoin, rng.randint(rejoin + 1, end)))
    if rng.random() < 0.3:
        agent = rng.choice(agents)
        start = rng.randint(1, end - 2)
        call.research.append(Research(agent, start, rng.randint(start + 1, min(end, start + 600))))
    if rng.random() < 0.05:  # someone in the back office researched it, never on the call
        start = rng.randint(1, end - 2)
        call.research.append(Research("backoffice", start, rng.randint(start + 1, end)))
    if rng.random() < 0.1:
        call.research_after_hang_up = rng.choice(agents)
    roll = rng.random()
    call.waive = "during" if roll < 0.04 else "after" if roll < 0.07 else ""


def _overlap(a: tuple[int, int | None], b: tuple[int, int | None], end: int) -> bool:
    a_end = end if a[1] is None else a[1]
    b_end = end if b[1] is None else b[1]
    return a[0] <= b_end and b[0] <= a_end
