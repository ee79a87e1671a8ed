"""A reference model of one account's money, for the model-based money test (issue 11).

Pure Python and independent of meterd's services: billable time is worked out here second by
second (meterd's timeline and rating modules are not used), funding is a plain sequential
simulation of billing-rules.md. Only `meterd.core.money.ceil_div` is borrowed.

A `Scenario` is one per_minute account in block card mode (rate 100 unless changed, blocks of 30
minutes for 3000, increment 60 s) or authorise card mode (each call's minutes that bank and
deposit cannot pay are paid by money from the call's authorisations, captured at settlement; no
blocks) and what happens to it: the bank, deposit and card it starts
with, deposits and rate changes at given moments, and one or two calls, each with 1 to 3 agents
who join, leave and are held, a customer who may be held, research flagged live (also after the
hang-up) or as one retroactive interval, a waiver during or after the call, and the card the
caller gives if asked for one. `predict(scenario)` says what meterd must show once every call is
settled and every card operation resolved.

Clocks. Times are whole seconds after the scenario's start. meterd's clock is the test's
ManualClock; Twilio stamps its callbacks `skew` seconds ahead of it (negative: behind). The
rules take conference time from Twilio's stamps, research from meterd's clock (README: research
start/stop use the server's clock), and billable(a) = union(active(a), research(a)) on that one
epoch axis; the model does exactly that (the "stamp" axis). The *true* moment of a billable
second is when it happened on meterd's clock: stamp - skew for conference time, the stamp itself
for research.

What is predicted EXACTLY (to the minute and the cent):
- whether each call is connected (the connect gate: bank >= 1 or deposit >= the rate in force
  at that moment, else a block on the card on file, else the card the caller gives, else not);
- per call and agent, the agent-minutes: ceil(billable_seconds / 60), billable = union(active,
  research), active = customer in and not held AND agent in and not held;
- the price of every money-paid minute: the rate in force at the moment the minute fell due
  (its ((n-1)*60)-th billable second). When a retroactive research interval moved that moment
  after the minute was taken live, either the final timeline's moment or the one known when it
  was taken (README: "a later correction ... does not re-price minutes already taken") is
  accepted, and the account is funded both ways;
- the account after settlement: bank minutes, deposit, amount owed (receivable) and card money
  kept (charged - refunded), from funding every minute, one by one, in the order meterd could
  first take it (the moment it fell due, or, for time only a retroactive research interval told
  meterd of, the moment that interval was posted): bank, then deposit at the minute's rate, then
  a block bought on a good card (credited to the bank), then debt (allow_debt) or owed
  (announce); and at each call's settlement (docs/billing.md, Settlement 3), from its first
  minute nothing could pay, the bank pays first again while it holds minutes (those minutes,
  then the deposit's minutes after the first of them), and a minute still owed is paid from
  the deposit if it holds its price. A waived call leaves the account exactly as if its
  charges had never been made, so the model simply leaves its charges out;
- per call, the bank minutes, deposit money and owed money it was charged (a waived call: 0).

What is a BOUND, and why:
- Blocks. meterd buys the next block a little early, when the bank and deposit "cannot pay the
  next minute of every accruing agent" (README), so a block can be bought that the calls then
  never need. The account may therefore show exactly ONE more block than the model: card money
  + 3000 and bank + 30 with deposit and owed unchanged, or, when later minutes were paid from
  that block (bank first) where the model paid them with money, bank + 30 - k with the deposit
  up and owed down by the price of those k minutes (between k x the lowest and k x the highest
  rate). Only when, at some moment, the funds left (bank + deposit // rate) were at most twice
  the agents then on calls and the minutes still to come fitted in those funds plus one per
  agent (else the early block was needed anyway); or when, at some moment, the funds left were
  fewer than the agents then on calls (meterd may buy a block then, see below) and the model
  buys no block after it (the minutes still to come were paid from money deposited later): k is
  then at most the minutes the model paid from the deposit after that moment. Two calls each
  buying a block where one suffices is NOT within the bound (issue 11, defect 7).
- A block bought early and needed anyway. meterd may buy a block from the first moment the
  funds left (bank + deposit // rate) are fewer than the agents then on calls (README: bank and
  deposit "cannot pay the next minute of every accruing agent"); the block lands in the bank and
  the bank pays first (billing-rules.md: the card "credits the bank, and goes on from the bank"),
  so minutes the model, buying only once nothing can pay, pays from the deposit after that
  moment (money the deposit still held then, or deposited later) may be paid from the block
  instead: the same card money, bank - k, the deposit up and owed down by the price of those k
  minutes. Only up to the minutes the model paid from the deposit after the first such moment
  (with one agent, the deposit's own minutes never: that moment comes only once the deposit
  cannot pay a minute, issue 11, defect 6; a deposit made after it, yes).
- Order of minutes due close together. Which of two minutes due at nearly the same moment is
  funded first is decided by when ticks run, so the model runs its funding four ways (minutes
  ordered on the stamp axis or the true axis, same-second ties broken one way or the other) and
  accepts any of the results (usually all four agree). Per-call splits are compared only when
  all four agree.
- Moments of meterd's clock are moved by `normalise` at least GUARD seconds away from the
  minutes, on both axes: a deposit and the second caller ringing from the moments a minute can
  first be taken, a rate change from the moments minutes fall due. So a tick that runs within
  the 2 s the rules allow cannot change which side of them a minute falls. Nothing else is
  nudged.
- The connect gate may find funds where the model buys a block: a block bought early (above)
  on an earlier call. Either is allowed; the account is checked as above.
- The connect gate of a call while another call of the account, Twilio's clock being behind
  ours, may hold up to one minute per agent that its final timeline will give back (meterd
  counts open intervals to its own "now"), may decide either way when the funds are that low;
  `predict(..., gates=...)` then models the decision meterd took, if it is one of those.
- Waivers that meet another call (two calls at once, or a waiver after a later call began):
  whether the later call should then have been funded differently is not settled by the rules,
  so such a scenario is `loose`: the account is checked by invariants only (the waived call's
  minute charges are all reversed, card money kept, in all and on the waived call, is at most
  what the other calls need plus one block, minutes and prices exact, ledger check).
- Liveness (issue 11, defect 1): after a tick at meterd time t, minute 1 must be posted if its
  moment (true axis, from what meterd had been told by then) is at or before t - 2, whatever
  the skew; a later minute n if its moment is at or before t - 2 - max(skew, 0): meterd counts
  conference time on Twilio's clock and reads that clock only in the callbacks, so when Twilio
  is ahead, a minute after the first may come up to `skew` seconds late (the rules do not say
  on whose clock "within 2 seconds" is measured).
- Replayed from the ledger in commit order (an invariant, not from the model): no minute is
  owed or put on debt while the bank held a minute or the deposit its price. The stronger "no
  deposit-paid minute while the bank held a minute" is NOT checked: an early block's minutes
  sit in the bank while the deposit still pays first (defect 6's required outcome).

Not modelled: per-incident and service-agreement plans, gateway timeouts
and late successes, webhooks delivered late or twice (tests/integration/test_metering_properties
covers those for one call).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import product

from meterd.core.money import ceil_div

INCREMENT = 60
BLOCK_MINUTES = 30
BLOCK_PRICE = 3000
BASE_RATE = 100
SETTLE_DELAY = 120
GUARD = 3  # seconds kept between a minute's due moment and any moment of meterd's clock

GOOD_CARD = "pm_card_visa"
FAILING_CARD = "pm_card_chargeCustomerFail"  # attaches to a customer; every charge is declined

FUNDED, BLOCK, REJECTED = "funded", "block", "rejected"  # connect-gate decisions


# --- the scenario -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    agent_id: str
    join: int  # seconds after the call rang (Twilio stamps it `skew` later)
    leave: int | None = None  # None: until the conference ends
    hold: tuple[int, int] | None = None  # held [hold[0], hold[1])


@dataclass(frozen=True)
class Research:
    agent_id: str
    start: int  # seconds after the call rang, meterd's clock
    stop: int
    live: bool = True  # start/stop posted as they happen; else one interval posted at `stop`


@dataclass(frozen=True)
class Call:
    start: int  # when the caller rings, seconds after the scenario began (meterd's clock)
    end: int  # the customer hangs up, seconds after `start`
    agents: tuple[Agent, ...]
    customer_hold: tuple[int, int] | None = None
    research: tuple[Research, ...] = ()
    waiver_at: int | None = None  # seconds after `start`, meterd's clock
    pay_token: str | None = None  # the card the caller gives if asked for one

    def ended_at(self, skew: int) -> int:
        """meterd's clock reading of the call's end as meterd records it (Twilio's stamp)."""
        return self.start + self.end + skew

    def settles_at(self, skew: int, delay: int = SETTLE_DELAY) -> int:
        """The first moment settlement may run: `delay` after the end, research closed."""
        live_stops = [self.start + r.stop for r in self.research if r.live]
        return max([self.ended_at(skew) + delay, *live_stops])


@dataclass(frozen=True)
class Scenario:
    skew: int  # Twilio's clock minus meterd's
    bank: int  # minutes banked at the start
    deposit: int  # deposit at the start, minor units
    card: str | None  # card on file at the start (GOOD_CARD, FAILING_CARD or None)
    on_exhausted: str  # announce or allow_debt
    rates: tuple[tuple[int, int], ...]  # (effective from, rate per agent-minute)
    deposits: tuple[tuple[int, int], ...]  # (at, amount)
    calls: tuple[Call, ...]
    ticks: tuple[int, ...] = ()  # extra ticks at these moments (meterd's clock)
    card_mode: str = "block"  # block: blocks into the bank; authorize: holds, paid by money

    @property
    def authorize(self) -> bool:
        return self.card_mode == "authorize"

    def rate_at(self, moment: int) -> int:
        rate = BASE_RATE
        for effective, amount in sorted(self.rates):
            if effective <= moment:
                rate = amount
        return rate


# --- billable time, second by second ------------------------------------------------------------


@dataclass(frozen=True)
class Minute:
    call: int
    agent: str
    n: int
    due: int  # stamp axis: the moment the rules say the minute fell due (its rate's moment)
    true_due: int  # the same on meterd's clock
    # the first moment meterd could post it: its billable time had begun AND meterd had been
    # told of it (a retroactive research interval is known only once posted), on each axis
    funded: int
    funded_true: int
    # stamp axis: when it fell due by the timeline meterd knew when it could first take it
    # (earlier than `due` only if a retroactive research interval came after)
    due_taken: int

    @property
    def moments(self) -> tuple[int, ...]:
        return (self.due, self.true_due, self.funded, self.funded_true, self.due_taken)


@dataclass
class AgentTime:
    # per billable second (stamp axis): (its moment on meterd's clock, the moment meterd could
    # know it was billable on meterd's clock, the same on the stamp axis)
    seconds: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def billable_seconds(self) -> int:
        return len(self.seconds)

    @property
    def minutes(self) -> int:
        return ceil_div(len(self.seconds), INCREMENT)

    def minute(self, index: int, agent: str, n: int) -> Minute:
        """Minute n falls due with the ((n-1)*60)-th billable second (in each order)."""
        k = (n - 1) * INCREMENT
        columns = list(zip(*self.seconds.values(), strict=True))
        due, true_due = sorted(self.seconds)[k], sorted(columns[0])[k]
        funded, funded_true = sorted(columns[2])[k], sorted(columns[1])[k]
        known = sorted(x for x, (_, at, _) in self.seconds.items() if at <= funded_true)
        return Minute(index, agent, n, due, true_due, funded, funded_true, known[k])

    def known_by(self, moment: int) -> int:
        """Billable seconds that had begun, by meterd's clock, and that meterd knew of."""
        return sum(1 for _, known, _ in self.seconds.values() if known <= moment)


def call_time(scenario: Scenario, call: Call) -> dict[str, AgentTime]:
    """Per agent, its billable seconds on the stamp axis."""
    stamp0 = call.start + scenario.skew
    customer_held = set(range(*call.customer_hold)) if call.customer_hold else set()
    customer_free = [o for o in range(call.end) if o not in customer_held]
    times: dict[str, AgentTime] = {}
    for agent in call.agents:
        time = times.setdefault(agent.agent_id, AgentTime())
        leave = call.end if agent.leave is None else min(agent.leave, call.end)
        held = set(range(*agent.hold)) if agent.hold else set()
        for offset in customer_free:
            if agent.join <= offset < leave and offset not in held:
                true = call.start + offset
                time.seconds[stamp0 + offset] = (true, true, stamp0 + offset)
    for mark in call.research:
        time = times.setdefault(mark.agent_id, AgentTime())
        for moment in range(call.start + mark.start, call.start + mark.stop):
            known = moment if mark.live else call.start + mark.stop
            true, known_true, known_stamp = time.seconds.get(moment, (moment, known, known))
            time.seconds[moment] = (
                min(true, moment),
                min(known_true, known),
                min(known_stamp, known),
            )
    return times


def minutes_of(scenario: Scenario, index: int, times: dict[str, AgentTime]) -> list[Minute]:
    out = []
    for agent_id, time in sorted(times.items()):
        for n in range(1, time.minutes + 1):
            out.append(time.minute(index, agent_id, n))
    return out


def _windows(minutes: list[Minute], *, price: bool) -> list[tuple[int, int]]:
    """Around each minute's due moment on both axes (`price`: where a rate change would make
    its rate depend on the axis), else around the moments meterd could first post it (where a
    deposit or a caller ringing would make the order depend on when a tick ran)."""
    out = []
    for m in minutes:
        if price:  # the final moment and the one known when taken, each on both axes
            spread = abs(m.true_due - m.due)
            spans = [
                (min(m.due, m.true_due), max(m.due, m.true_due)),
                (m.due_taken - spread, m.due_taken + spread),
            ]
        else:
            spans = [(min(m.funded, m.funded_true), max(m.funded, m.funded_true))]
        out += [(low - GUARD, high + GUARD) for low, high in spans]
    return out


def _clear(moment: int, windows: list[tuple[int, int]]) -> int:
    """The first moment at or after `moment` outside every window."""
    moved = True
    while moved:
        moved = False
        for low, high in windows:
            if low <= moment <= high:
                moment, moved = high + 1, True
    return moment


def normalise(scenario: Scenario) -> Scenario:
    """Move the moments of meterd's clock (a later caller ringing, deposits, rate changes) off
    every minute's due moment by GUARD seconds on both axes (see the module docstring)."""
    calls = sorted(scenario.calls, key=lambda c: c.start)
    placed: list[Call] = []
    minutes: list[Minute] = []
    for call in calls:
        start = _clear(call.start, _windows(minutes, price=False)) if placed else call.start
        call = dataclasses.replace(call, start=start)
        placed.append(call)
        minutes += minutes_of(scenario, len(placed) - 1, call_time(scenario, call))
    funding = _windows(minutes, price=False)
    deposits = tuple(sorted((_clear(at, funding), amount) for at, amount in scenario.deposits))
    pricing = _windows(minutes, price=True)
    rates: dict[int, int] = {}
    for effective, amount in sorted(scenario.rates):
        moment = _clear(effective, pricing)
        while moment in rates:
            moment = _clear(moment + 1, pricing)
        rates[moment] = amount
    return dataclasses.replace(
        scenario, calls=tuple(placed), deposits=deposits, rates=tuple(sorted(rates.items()))
    )


# --- funding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    bank_minutes: int = 0  # banked minutes the call used (card-bought ones too)
    deposit_minor: int = 0  # deposit money it used (debt too)
    owed_minor: int = 0
    card_minor: int = 0  # authorise mode: money of its minutes its authorisations paid


@dataclass(frozen=True)
class Outcome:
    bank: int
    deposit: int
    owed: int
    card_kept: int
    blocks: int
    splits: tuple[Split, ...]
    early_block_possible: bool  # one more block than needed is within the rules
    # minutes the model pays with money that a block bought early (and needed anyway: the model
    # buys one later) may pay from the bank instead: the minutes it paid from the deposit after
    # the first moment the funds left were fewer than the agents on calls (README: meterd may
    # buy the block then)
    block_ahead_minutes: int = 0
    # of one block more than the model's, the most minutes it may have paid, bank first, that
    # the model paid with money
    early_block_minutes: int = 0


@dataclass
class _State:
    bank: int
    deposit: int
    card: str | None
    owed: int = 0
    card_kept: int = 0
    blocks: int = 0
    early: bool = False
    deposit_minutes: int = 0  # minutes paid from deposit money (not debt)
    # (blocks bought, deposit minutes paid) at each moment meterd may buy a block ahead: the
    # funds left fewer than the agents on calls
    ahead_points: list[tuple[int, int]] = field(default_factory=list)


def _gate(state: _State, call: Call, rate: int) -> str:
    if state.bank >= 1 or state.deposit >= rate:
        return FUNDED
    if state.card == GOOD_CARD or call.pay_token == GOOD_CARD:
        return BLOCK
    return REJECTED


def _apply_gate(
    state: _State, call: Call, decision: str, charged: bool, *, authorize: bool
) -> None:
    if decision == FUNDED:
        return
    if state.card != GOOD_CARD and call.pay_token is not None:
        state.card = call.pay_token  # the card the caller gave is kept on file
    if decision == BLOCK and charged and not authorize:  # authorise mode: a hold, no money yet
        state.bank += BLOCK_MINUTES
        state.card_kept += BLOCK_PRICE
        state.blocks += 1


def _fund(
    scenario: Scenario,
    minutes: list[Minute],
    gates: dict[int, str],
    charged_calls: set[int],
    *,
    true_axis: bool,
    reverse_ties: bool,
    price_when_taken: bool = False,
    settled_by: int | None = None,
) -> Outcome:
    """Fund every minute, one by one, in the order meterd could first take it (on one axis,
    same-moment ties broken one way), with the deposits, connect gates and settlements (those
    before `settled_by`, if given) in between."""
    allow_debt = scenario.on_exhausted == "allow_debt"
    state = _State(scenario.bank, scenario.deposit, scenario.card)
    ranks = sorted({(m.call, m.agent) for m in minutes})
    rank = {pair: (-i if reverse_ties else i) for i, pair in enumerate(ranks)}
    happenings: list[tuple[int, int, int, object]] = []
    for at, amount in scenario.deposits:
        happenings.append((at, 0, 0, ("deposit", amount)))
    for index, call in enumerate(scenario.calls):
        happenings.append((call.start, 1, index, ("gate", index)))
    for minute in minutes:
        if minute.call not in charged_calls or gates[minute.call] == REJECTED:
            continue
        moment = minute.funded_true if true_axis else minute.funded
        moment = max(moment, scenario.calls[minute.call].start)  # never before its own gate
        happenings.append((moment, 2, rank[(minute.call, minute.agent)] * 1000 + minute.n, minute))
    for index, call in enumerate(scenario.calls):
        settles_at = call.settles_at(scenario.skew)
        if index in charged_calls and (settled_by is None or settles_at < settled_by):
            happenings.append((settles_at, 3, index, ("settle", index)))
    happenings.sort(key=lambda h: h[:3])
    paid: list[list[_Paid]] = [[] for _ in scenario.calls]  # each call's minutes, as funded
    remaining = sum(1 for h in happenings if isinstance(h[3], Minute))
    splits = [Split() for _ in scenario.calls]
    spans = _agent_spans(scenario, minutes)
    for moment, _, _, what in happenings:
        if isinstance(what, Minute):
            remaining -= 1
            rate = scenario.rate_at(what.due_taken if price_when_taken else what.due)
            split = splits[what.call]
            deposit_before = state.deposit
            good_card = state.card == GOOD_CARD
            if state.bank < 1 and state.deposit < rate and good_card and not scenario.authorize:
                state.bank += BLOCK_MINUTES
                state.card_kept += BLOCK_PRICE
                state.blocks += 1
            if state.bank >= 1:
                state.bank -= 1
                split = dataclasses.replace(split, bank_minutes=split.bank_minutes + 1)
                source = "bank"
            elif state.deposit < rate and good_card and scenario.authorize:
                # the call's authorisation pays; captured at settlement
                state.card_kept += rate
                split = dataclasses.replace(split, card_minor=split.card_minor + rate)
                source = "card"
            elif state.deposit >= rate or allow_debt:
                source = "deposit" if state.deposit >= rate else "debt"
                if state.deposit >= rate:
                    state.deposit_minutes += 1
                state.deposit -= rate
                split = dataclasses.replace(split, deposit_minor=split.deposit_minor + rate)
            else:
                source = "owed"
                state.owed += rate
                split = dataclasses.replace(split, owed_minor=split.owed_minor + rate)
            splits[what.call] = split
            paid[what.call].append(_Paid(source, rate, deposit_before))
        elif what[0] == "deposit":
            state.deposit += what[1]
        elif what[0] == "settle":
            index = what[1]
            splits[index] = _settle(state, paid[index], splits[index])
            held = gates[index] == BLOCK or any(p.source == "card" for p in paid[index])
            if scenario.authorize and held and state.card == GOOD_CARD:
                splits[index] = _settle_from_the_hold(state, paid[index], splits[index])
        else:
            index = what[1]
            _apply_gate(
                state,
                scenario.calls[index],
                gates[index],
                index in charged_calls,
                authorize=scenario.authorize,
            )
        if state.card == GOOD_CARD and not scenario.authorize:  # blocks bought ahead of need
            rate_now = scenario.rate_at(moment)
            left = state.bank + max(state.deposit, 0) // rate_now
            agents = sum(1 for low, high in spans if low <= moment <= high)
            if left <= 2 * max(agents, 1) and remaining <= left + agents:
                state.early = True
            if left < agents:  # meterd may buy the block now, and pay bank first from then on
                state.ahead_points.append((state.blocks, state.deposit_minutes))
    # minutes paid from the deposit after meterd may have bought a block ahead: a block it
    # needed anyway (the model buys it later) may have paid them, bank first ...
    ahead = [state.deposit_minutes - paid for b, paid in state.ahead_points if b < state.blocks]
    # ... and one the model never buys (it buys no block after that moment: the minutes still
    # to come were paid from money deposited later) is one block more, which may have paid them
    extra = [state.deposit_minutes - paid for b, paid in state.ahead_points if b == state.blocks]
    early_minutes = min(max(extra, default=0), BLOCK_MINUTES)
    if state.early:
        early_minutes = BLOCK_MINUTES
    return Outcome(
        bank=state.bank,
        deposit=state.deposit,
        owed=state.owed,
        card_kept=state.card_kept,
        blocks=state.blocks,
        splits=tuple(splits),
        early_block_possible=state.early or bool(extra),
        block_ahead_minutes=max(ahead, default=0),
        early_block_minutes=early_minutes,
    )


@dataclass
class _Paid:
    source: str  # bank, deposit, card (authorise mode), debt or owed
    price: int
    deposit_before: int  # the deposit just before this minute was funded


def _settle(state: _State, paid: list[_Paid], split: Split) -> Split:
    """A call's settlement (docs/billing.md, Settlement 3): from the first of its minutes that
    nothing could pay (owed or debt), the bank pays first again while it holds minutes: those
    minutes (in the order funded), then the minutes the deposit paid after the first of them.
    Then a minute still owed is paid from the deposit if it holds its price."""
    unpaid = [i for i, p in enumerate(paid) if p.source in ("owed", "debt")]
    rebook = [i for i in unpaid][: max(state.bank, 0)]
    if rebook:
        after = [i for i, p in enumerate(paid) if p.source == "deposit" and i > rebook[0]]
        rebook += after[: max(state.bank - len(rebook), 0)]
    for i in rebook:
        minute = paid[i]
        state.bank -= 1
        if minute.source == "owed":
            state.owed -= minute.price
        else:
            state.deposit += minute.price
        split = _moved(split, minute, "bank")
    for minute in paid:
        if minute.source == "owed" and 0 < minute.price <= state.deposit:
            state.owed -= minute.price
            state.deposit -= minute.price
            split = _moved(split, minute, "deposit")
    return split


def _settle_from_the_hold(state: _State, paid: list[_Paid], split: Split) -> Split:
    """Authorise mode, a call that holds an authorisation (from its gate, or bought for its
    minutes): at settlement, each of its minutes still owed or on debt is paid from the card,
    also one taken before the card was on file (docs/billing.md, Settlement 3: the card is
    collected rather than a receivable invoiced, as a block bought later pays such a minute
    in block mode). A debt minute gives its money back to the deposit, and that money pays
    the call's later card minutes while the deposit (as it was then, and as it is now) holds
    their price. The hold is taken to be large enough (meterd pays only while it holds the
    price; a scenario's calls are too short to use up 30 minutes of authorisations)."""
    freed_at: list[tuple[int, int]] = []  # (position, price) of debt minutes moved
    onto_the_card: set[int] = set()
    for i, minute in enumerate(paid):
        if minute.source not in ("owed", "debt") or minute.price <= 0:
            continue
        if minute.source == "owed":
            state.owed -= minute.price
        else:
            state.deposit += minute.price
            freed_at.append((i, minute.price))
        state.card_kept += minute.price
        split = _moved(split, minute, "card")
        onto_the_card.add(i)
    moved = 0
    for i, minute in enumerate(paid):
        if minute.source != "card" or not freed_at or i in onto_the_card:
            continue
        freed = sum(price for at, price in freed_at if at < i) - moved
        then = minute.deposit_before + freed
        if 0 < minute.price <= min(then, state.deposit):
            state.deposit -= minute.price
            state.card_kept -= minute.price
            moved += minute.price
            split = _moved(split, minute, "deposit")
    return split


_SPLIT_COLUMN = {
    "owed": "owed_minor",
    "debt": "deposit_minor",
    "deposit": "deposit_minor",
    "card": "card_minor",
}


def _moved(split: Split, minute: _Paid, payer: str) -> Split:
    """The call's split once `minute` is paid by `payer` (bank, deposit or card) instead of
    its source; the minute's source becomes `payer`. A bank minute counts one banked minute,
    any other its price."""
    changes = {_SPLIT_COLUMN[minute.source]: getattr(split, _SPLIT_COLUMN[minute.source])}
    changes[_SPLIT_COLUMN[minute.source]] -= minute.price
    if payer == "bank":
        changes["bank_minutes"] = split.bank_minutes + 1
    else:
        column = _SPLIT_COLUMN[payer]
        changes[column] = changes.get(column, getattr(split, column)) + minute.price
    minute.source = payer
    return dataclasses.replace(split, **changes)


def _agent_spans(scenario: Scenario, minutes: list[Minute]) -> list[tuple[int, int]]:
    """Per (call, agent), from its first minute's moment to its last billable second, on the
    earlier of the two axes (generous: for the early-block bound)."""
    spans: dict[tuple[int, str], list[int]] = {}
    for m in minutes:
        spans.setdefault((m.call, m.agent), []).extend(m.moments)
    return [(min(v), max(v) + INCREMENT) for v in spans.values()]


# --- the prediction -----------------------------------------------------------------------------


@dataclass
class Prediction:
    scenario: Scenario
    times: list[dict[str, AgentTime]]
    minutes: list[Minute]
    gates: dict[int, str]  # the decision modelled, per call
    gate_options: dict[int, set[str]]  # decisions within the rules, per call
    outcomes: list[Outcome]  # acceptable account results (one per funding order, deduplicated)
    loose: str  # why only invariants are checked ("" when exact)
    waived: set[int]  # calls with a waiver (and connected)
    exact_outcome: Outcome | None = None  # set by account_problem

    def connected(self, index: int) -> bool:
        return self.gates[index] != REJECTED

    def agent_minutes(self, index: int) -> dict[str, int]:
        if not self.connected(index):
            return {}
        return {a: t.minutes for a, t in self.times[index].items()}

    def minute(self, index: int, agent: str, n: int) -> Minute | None:
        for m in self.minutes:
            if (m.call, m.agent, m.n) == (index, agent, n):
                return m
        return None

    def prices(self, index: int, agent: str, n: int) -> set[int]:
        """The rate in force when the minute fell due, by the final timeline or by the one
        known when it was taken (README's decision; they differ only when a retroactive
        research interval moved the minute's moment across a rate change)."""
        m = self.minute(index, agent, n)
        if m is None:
            return set()
        return {self.scenario.rate_at(m.due), self.scenario.rate_at(m.due_taken)}

    def required_live(self, index: int, agent: str, moment: int) -> int:
        """Minutes that must be posted after a tick at `moment` (meterd's clock): minute 1
        within 2 s of billable time starting, whatever the skew (issue 11, defect 1); a later
        minute within 2 s plus however far Twilio's clock is ahead of ours (meterd counts
        conference time on Twilio's clock, which it only reads in the callbacks)."""
        time = self.times[index].get(agent)
        if time is None or not self.connected(index) or index in self.waived:
            return 0
        first = min(1, time.known_by(moment - 2))
        lag = max(self.scenario.skew, 0)
        return max(first, ceil_div(time.known_by(moment - 2 - lag), INCREMENT))

    @property
    def splits_exact(self) -> bool:
        """Per-call splits are compared when the account matched an outcome exactly (no early
        block) and every funding order gives the same splits."""
        return self.exact_outcome is not None and len({o.splits for o in self.outcomes}) == 1

    @property
    def card_kept_most(self) -> int:
        """Loose scenarios: the most card money the calls not waived can need (one block more
        than the model's most; authorise mode: every minute at the highest rate)."""
        if self.scenario.authorize:
            highest = max([BASE_RATE, *(rate for _, rate in self.scenario.rates)])
            return len(self.minutes) * highest
        return (max(o.blocks for o in self.outcomes) + 1) * BLOCK_PRICE

    def account_problem(self, bank: int, deposit: int, owed: int, card_kept: int) -> str:
        """'' if the account after settlement is one the rules allow, else why not. Sets
        `exact_outcome` to the outcome matched exactly (None: loose, or a block bought early)."""
        self.exact_outcome = None
        got = {"bank": bank, "deposit": deposit, "owed": owed, "card_kept": card_kept}
        if self.loose:
            most = self.card_kept_most
            debt = self.scenario.on_exhausted == "allow_debt"
            if 0 <= card_kept <= most and bank >= 0 and owed >= 0 and (debt or deposit >= 0):
                return ""
            return (
                f"account {got} ({self.loose}; only bounds apply: card kept 0..{most}, "
                f"bank, owed{'' if debt else ' and deposit'} not negative)"
            )
        for o in self.outcomes:
            if (bank, deposit, owed, card_kept) == (o.bank, o.deposit, o.owed, o.card_kept):
                self.exact_outcome = o
                return ""
        rates = {BASE_RATE, *(r for _, r in self.scenario.rates)}

        def paid_from_the_bank(o: Outcome, extra_minutes: int, most: int) -> bool:
            """1 to `most` minutes the model paid with money were paid from the bank."""
            moved = o.bank + extra_minutes - bank
            money = deposit - o.deposit + o.owed - owed
            return (
                0 < moved <= most
                and bank >= 0
                and moved * min(rates) <= money <= moved * max(rates)
                and deposit >= o.deposit
                and owed <= o.owed
            )

        for o in self.outcomes:
            if o.early_block_possible and card_kept == o.card_kept + BLOCK_PRICE:
                if (bank, deposit, owed) == (o.bank + BLOCK_MINUTES, o.deposit, o.owed):
                    return ""  # one block bought early and never needed
                # ... or its minutes paid, bank first, minutes the model paid with money
                if paid_from_the_bank(o, BLOCK_MINUTES, o.early_block_minutes):
                    return ""
            # a block bought early and needed anyway: the bank paid first minutes the model
            # paid from the deposit after meterd may have bought it
            if card_kept == o.card_kept and paid_from_the_bank(o, 0, o.block_ahead_minutes):
                return ""
        wanted = [
            {
                "bank": o.bank,
                "deposit": o.deposit,
                "owed": o.owed,
                "card_kept": o.card_kept,
                "blocks": o.blocks,
                "one_more_block_allowed": o.early_block_possible,
                "its_minutes_paying_money_minutes": o.early_block_minutes,
                "block_ahead_minutes": o.block_ahead_minutes,
            }
            for o in self.outcomes
        ]
        return f"account {got}; the model allows {wanted}"


def predict(scenario: Scenario, gates: dict[int, str] | None = None) -> Prediction:
    """What meterd must show after settlement. `gates` fixes connect-gate decisions that the
    model allows either way (`Prediction.gate_options`) to the ones meterd took."""
    times = [call_time(scenario, call) for call in scenario.calls]
    minutes = [m for i, t in enumerate(times) for m in minutes_of(scenario, i, t)]
    waived = {i for i, call in enumerate(scenario.calls) if call.waiver_at is not None}
    loose = _loose(scenario, waived)
    every = set(range(len(scenario.calls)))
    kept = every - waived  # a waived call's charges are as if never made
    natural, options = _gates(scenario, minutes, kept)
    if loose:  # the gate may also have seen a waived call's charges still in place
        natural_all, options_all = _gates(scenario, minutes, every)
        for index, decisions in options_all.items():
            options[index] |= decisions | {natural_all[index]}
    chosen = dict(natural)
    for index, decision in (gates or {}).items():
        if decision in options[index]:
            chosen[index] = decision
    waived = {i for i in waived if chosen[i] != REJECTED}
    outcomes: list[Outcome] = []
    for true_axis, reverse_ties, price_when_taken in product((False, True), repeat=3):
        outcome = _fund(
            scenario,
            minutes,
            chosen,
            every - waived,
            true_axis=true_axis,
            reverse_ties=reverse_ties,
            price_when_taken=price_when_taken,
        )
        if outcome not in outcomes:
            outcomes.append(outcome)
    return Prediction(scenario, times, minutes, chosen, options, outcomes, loose, waived)


def _gates(
    scenario: Scenario, minutes: list[Minute], charged: set[int]
) -> tuple[dict[int, str], dict[int, set[str]]]:
    """Each call's connect-gate decision in time order, and the decisions within the rules."""
    decisions: dict[int, str] = {}
    options: dict[int, set[str]] = {}
    for index, call in enumerate(scenario.calls):
        # fund everything before this caller rang, with the decisions so far
        earlier = [m for m in minutes if m.call < index]
        trial = dataclasses.replace(
            scenario,
            calls=scenario.calls[:index],
            deposits=tuple(d for d in scenario.deposits if d[0] <= call.start),
        )
        state = _state_at(trial, earlier, decisions, charged, call.start)
        rate = scenario.rate_at(call.start)
        decision = _gate(state, call, rate)
        decisions[index] = decision
        options[index] = {decision}
        if decision == BLOCK and state.card == GOOD_CARD:
            # a block bought early on an earlier call may still be in the bank (README)
            options[index].add(FUNDED)
        if scenario.skew < 0 and decision == FUNDED:
            # Twilio behind us: an earlier call still open may hold up to a minute per agent
            # that its final timeline gives back, so meterd may see no funds here
            held_back = sum(
                len(other.agents)
                for j, other in enumerate(scenario.calls[:index])
                if decisions[j] != REJECTED and other.settles_at(scenario.skew) >= call.start
            )
            if state.bank + max(state.deposit, 0) // rate <= held_back:
                options[index].add(_gate(_State(0, -1, state.card), call, rate))
    return decisions, options


def _state_at(
    scenario: Scenario,
    minutes: list[Minute],
    gates: dict[int, str],
    charged: set[int],
    moment: int,
) -> _State:
    """The account at `moment` (stamp-axis order; GUARD makes both axes agree here)."""
    due = [
        m
        for m in minutes
        if max(m.funded, scenario.calls[m.call].start) < moment
        and max(m.funded_true, scenario.calls[m.call].start) < moment
    ]
    outcome = _fund(
        scenario,
        due,
        gates,
        charged & set(range(len(scenario.calls))),
        true_axis=False,
        reverse_ties=False,
        settled_by=moment,
    )
    card = scenario.card
    for index, call in enumerate(scenario.calls):
        if gates[index] != FUNDED and card != GOOD_CARD and call.pay_token is not None:
            card = call.pay_token
    return _State(outcome.bank, outcome.deposit, card, outcome.owed)


def _loose(scenario: Scenario, waived: set[int]) -> str:
    """Why a waiver meets another call, if it does (then only invariants are checked)."""
    skew = scenario.skew
    for index in sorted(waived):
        call = scenario.calls[index]
        assert call.waiver_at is not None
        low = call.start
        high = max(call.start + call.waiver_at, call.settles_at(skew))
        for other_index, other in enumerate(scenario.calls):
            if other_index == index:
                continue
            if other.start <= high and low <= other.settles_at(skew):
                return (
                    f"call {index} is waived at {call.start + call.waiver_at} while call "
                    f"{other_index} ({other.start}..{other.settles_at(skew)}) is open"
                )
    return ""
