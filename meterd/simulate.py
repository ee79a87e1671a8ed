"""Drive a running meterd exactly as Twilio and a support desk would, and check every charge.

    python -m meterd.simulate --url http://127.0.0.1:8080 --calls 200 --cps 20 \
        [--duplicates] [--reorder] [--seed N] [--time-scale 0]

The simulator sets up its own accounts (per_minute paid from banked minutes, from a prepaid deposit,
and from both; a service agreement; per_incident), then places N calls at `cps` new calls per
second. Each call is what Twilio would send for the topology in docs/twilio-setup.md: the signed
voice webhook (and the PIN `<Gather>` for a withheld number), the conference status callbacks
(customer and 1 to `agents_max` agents labelled `agent:<id>`, holds of the customer and of agents,
an agent re-dialling), the customer leg's `completed` status callback; some callers hang up in the
menu (a `completed` before any conference event). Agents flag research through `/agents/research`
(retroactive intervals during the call, start/stop after the caller hung up) and waive some calls
(during the call and after settlement). With `--duplicates` some requests are delivered twice (at
the same moment, or later); with `--reorder` the callbacks of a call arrive shuffled.

Timing: with `--time-scale 0` (the default) nothing waits. Twilio's `Timestamp`s are synthetic:
each call is placed in the recent past, ending `settle_delay` seconds before it is delivered, so
meterd settles it at its next tick. A call's callbacks that change its timeline are delivered
before the ones that end it (a callback arriving after settlement no longer changes charges: the
rules' settle delay exists for exactly that). With `--time-scale S` > 0 each callback is sent
S x its offset after the call began (1 = real time, live metering included), its Timestamp never
ahead of the clock.

The simulator keeps its own expectation of every call, worked out second by second from the
scenario by the rules of docs/billing.md (active, research, billable, hold; whole minutes
rounded up; plan and funding), without any of meterd's code. It waits for meterd to settle every
call, reads each back (`GET /admin/calls/{sid}`, and the call's ledger), compares, checks the
accounts' balances, prints a summary and exits 0 when everything matched, 1 listing every
difference otherwise, 2 when it could not run (bad arguments, meterd unreachable, setup refused).

Tokens: `--twilio-auth-token`, `--admin-token`, `--agents-token`, `--public-base-url` or
METERD_TWILIO_AUTH_TOKEN, METERD_ADMIN_TOKEN, METERD_AGENTS_TOKEN, METERD_PUBLIC_BASE_URL; those
not given are read from the daemon's state directory, `<dir>/secrets/<name>` (`--state-dir DIR`,
else, under `meterd simulate`, the `state_dir` setting): the admin and agents tokens meterd
generated there, and a `twilio_auth_token` file if one was put there (`meterd demo` does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

__all__ = ["add_arguments", "main", "run_parsed", "sign", "simulate"]

ACCOUNT_SID = "AC" + "5" * 32  # the Twilio account the simulated calls belong to
SUPPORT_NUMBER = "+18005550100"
WITHHELD_NUMBER = "+266696687"  # what Twilio sends as From for an anonymous caller
AGENT_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
INCIDENT_SECONDS = 2 * 60 * 60
REQUEST_TIMEOUT_SECONDS = 30
EXIT_OK, EXIT_DIFFERENCES, EXIT_CANNOT_RUN = 0, 1, 2


# --- Twilio's side: signatures, payloads -------------------------------------------------------


def sign(url: str, params: Iterable[tuple[str, str]], auth_token: str) -> str:
    """X-Twilio-Signature of a form POST, as docs/twilio-setup.md documents it: the full URL,
    then each parameter name in byte order followed by its value (a repeated name: each distinct
    value, sorted), HMAC-SHA1 keyed with the auth token, base64."""
    values: dict[str, set[str]] = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    message = url
    for name in sorted(values, key=lambda n: n.encode()):
        for value in sorted(values[name], key=lambda v: v.encode()):
            message += name + value
    digest = hmac.new(auth_token.encode(), message.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def rfc2822(epoch_seconds: int) -> str:
    return format_datetime(dt.datetime.fromtimestamp(epoch_seconds, dt.UTC), usegmt=False)


def iso(epoch_seconds: int) -> str:
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).isoformat()


def _call_fields(call_sid: str, from_number: str, status: str) -> dict[str, str]:
    return {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": status,
        "Direction": "inbound",
        "From": from_number,
        "Caller": from_number,
        "To": SUPPORT_NUMBER,
        "Called": SUPPORT_NUMBER,
        "FromCountry": "US",
        "CallerCountry": "US",
        "ToCountry": "US",
        "CalledCountry": "US",
    }


def _participant_fields(leg_sid: str, label: str, *, held: bool) -> dict[str, str]:
    return {
        "CallSid": leg_sid,
        "ParticipantLabel": label,
        "Muted": "false",
        "Hold": "true" if held else "false",
        "Coaching": "false",
        "EndConferenceOnExit": "true" if label == "customer" else "false",
        "StartConferenceOnEnter": "true",
    }


# --- the scenario ------------------------------------------------------------------------------


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


# --- the expectation, independently of meterd's code -------------------------------------------


@dataclass(frozen=True)
class Prices:
    rate_minor: int  # one agent-minute from the deposit
    incident_minor: int
    increment_seconds: int


def expect(call: PlannedCall, prices: Prices) -> dict[str, Any]:
    """What docs/billing.md says meterd must show for the call, counted second by second."""
    zero = {
        "bank_minutes": 0,
        "deposit_minor": 0,
        "card_minor": 0,
        "owed_minor": 0,
        "incidents": 0,
        "waived": bool(call.waive),
    }
    if call.kind != "connected":
        return {
            "status": "rejected" if call.kind == "menu_pin" else "ended",
            "hold_seconds": 0,
            "agents": {},
            "charges": zero,
        }
    customer = [leg for leg in call.legs if leg.who == "customer"]
    agent_legs: dict[str, list[Leg]] = {}
    for leg in call.legs:
        if leg.who != "customer":
            agent_legs.setdefault(leg.who, []).append(leg)
    research: dict[str, list[Research]] = {}
    for mark in call.research:
        research.setdefault(mark.agent, []).append(mark)
    agents = sorted(agent_legs.keys() | research.keys())
    seconds = {a: {"active": 0, "research": 0, "billable": 0} for a in agents}
    hold = union_billable = 0
    horizon = max([call.end, *(m.end for m in call.research)])
    for t in range(horizon):  # second [t, t + 1) of the call; research starts at >= 0
        present = any(leg.join <= t < min(leg.leave, call.end) for leg in customer)
        customer_free = present and any(leg.available(t) for leg in customer) and t < call.end
        someone_active = someone_billable = False
        for agent in agents:
            active = customer_free and any(leg.available(t) for leg in agent_legs.get(agent, ()))
            researching = any(m.start <= t < m.end for m in research.get(agent, ()))
            seconds[agent]["active"] += active
            seconds[agent]["research"] += researching
            seconds[agent]["billable"] += active or researching
            someone_active |= active
            someone_billable |= active or researching
        hold += present and not someone_active
        union_billable += someone_billable
    increment = prices.increment_seconds
    view_agents = {
        agent: {
            "active_seconds": s["active"],
            "research_seconds": s["research"],
            "billable_seconds": s["billable"],
            "agent_minutes": -(-s["billable"] // increment),
        }
        for agent, s in seconds.items()
    }
    minutes = sum(a["agent_minutes"] for a in view_agents.values())
    charges = dict(zero)
    if not call.waive:
        kind = call.account.kind
        if kind == "bank":
            charges["bank_minutes"] = minutes
        elif kind == "deposit":
            charges["deposit_minor"] = minutes * prices.rate_minor
        elif kind == "mixed":  # bank first, then deposit: only the sum is the call's own
            del charges["bank_minutes"], charges["deposit_minor"]
            charges["minutes_paid"] = minutes
        elif kind == "incident":
            incidents = -(-union_billable // INCIDENT_SECONDS)
            charges["incidents"] = incidents
            charges["deposit_minor"] = incidents * prices.incident_minor
    return {"status": "ended", "hold_seconds": hold, "agents": view_agents, "charges": charges}


def compare(call: PlannedCall, expected: dict[str, Any], view: dict[str, Any], rate: int) -> list:
    out = []

    def differ(what: str, want: Any, got: Any) -> None:
        if want != got:
            out.append(f"{what}: expected {want!r}, meterd {got!r}")

    differ("status", expected["status"], view.get("status"))
    differ("hold_seconds", expected["hold_seconds"], view.get("hold_seconds"))
    got_agents = view.get("agents") or {}
    differ("agents", sorted(expected["agents"]), sorted(got_agents))
    for agent, want in expected["agents"].items():
        for name, value in want.items():
            differ(f"agents.{agent}.{name}", value, got_agents.get(agent, {}).get(name))
    charges = view.get("charges") or {}
    for name, value in expected["charges"].items():
        if name == "minutes_paid":
            bank, money = charges.get("bank_minutes", 0), charges.get("deposit_minor", 0)
            if money % rate or bank + money // rate != value:
                out.append(
                    f"charges: expected {value} minutes from bank and deposit, meterd "
                    f"bank_minutes={bank} deposit_minor={money} (rate {rate})"
                )
        else:
            differ(f"charges.{name}", value, charges.get(name))
    if not view.get("settled_at"):
        out.append("not settled")
    return out


# --- talking to meterd -------------------------------------------------------------------------


@dataclass
class Stats:
    webhooks: Counter[str] = field(default_factory=Counter)  # by route
    duplicates: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # webhook seconds
    agent_requests: int = 0
    admin_requests: int = 0
    failures: int = 0


class Meterd:
    """The HTTP client side: Twilio's signed webhooks, the agents' tool, the admin API."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        public_base_url: str,
        *,
        twilio_auth_token: str,
        admin_token: str,
        agents_token: str,
        concurrency: int,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.public_base_url = public_base_url.rstrip("/")
        self.twilio_auth_token = twilio_auth_token
        self.admin_token = admin_token
        self.agents_token = agents_token
        self.stats = Stats()
        self._slots = asyncio.Semaphore(concurrency)

    async def twilio(self, path_qs: str, params: Mapping[str, str]) -> tuple[int, str]:
        """POST a signed form to `path_qs` (e.g. "/twilio/pin?attempt=1") as Twilio would."""
        pairs = list(params.items())
        body = urlencode(pairs).encode("ascii")
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": sign(
                self.public_base_url + path_qs, pairs, self.twilio_auth_token
            ),
            "I-Twilio-Idempotency-Token": hashlib.sha256(body).hexdigest()[:32],
            "User-Agent": "TwilioProxy/1.1",
        }
        route = path_qs.split("?", 1)[0]
        self.stats.webhooks[route] += 1
        for attempt in (1, 2):  # Twilio retries once when it cannot connect (rc=1)
            async with self._slots:
                started = time.perf_counter()
                try:
                    async with self.session.post(
                        self.base_url + path_qs, data=body, headers=headers
                    ) as response:
                        text = await response.text()
                except (TimeoutError, aiohttp.ClientConnectionError) as error:
                    if attempt == 2:
                        self.stats.failures += 1
                        return 0, f"{type(error).__name__}: {error}"
                    continue
                self.stats.latencies.append(time.perf_counter() - started)
                self.stats.statuses[response.status] += 1
                return response.status, text
        raise AssertionError("unreachable")

    async def json(
        self, method: str, path: str, body: Any = None, *, token: str
    ) -> tuple[int, Any]:
        if token == self.agents_token:
            self.stats.agent_requests += 1
        else:
            self.stats.admin_requests += 1
        async with self._slots:
            try:
                async with self.session.request(
                    method,
                    self.base_url + path,
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    text = await response.text()
                    try:
                        return response.status, json.loads(text) if text else None
                    except ValueError:
                        return response.status, text
            except (TimeoutError, aiohttp.ClientConnectionError) as error:
                self.stats.failures += 1
                return 0, f"{type(error).__name__}: {error}"

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.json(method, path, body, token=self.admin_token)

    async def agents(self, path: str, body: Any) -> tuple[int, Any]:
        return await self.json("POST", path, body, token=self.agents_token)


class SetupFailed(Exception):
    pass


async def set_up_accounts(
    meterd: Meterd, rng: random.Random, nonce: int, calls: int
) -> dict[str, SimAccount]:
    """Five accounts of this run. Funds are ample: calls are never refused for money, so each
    call's charges follow from its own timeline."""
    valid_until = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=365)).isoformat()
    licence = [{"product": "desktop", "kind": "license", "ump_until": valid_until}]
    specs = {
        # plan, products, minutes granted, deposit (minor units)
        "bank": ("per_minute", licence, 200 * calls + 100, 10_000),
        "deposit": ("per_minute", [], 0, 50_000 * calls + 100_000),
        "mixed": ("per_minute", licence, 0, 50_000 * calls + 100_000),
        "agreement": ("service_agreement", [], 0, 0),
        "incident": ("per_incident", [], 0, 10_000 * calls + 100_000),
    }
    accounts = {}
    for number, (kind, (plan, products, minutes, deposit)) in enumerate(specs.items()):
        account = SimAccount(
            kind,
            f"sim-{nonce:08x}-{kind}",
            plan,
            [f"+1555{nonce % 10**6:06d}{number}{k:02d}" for k in range(8)],
        )
        body: dict[str, Any] = {
            "account_id": account.account_id,
            "name": f"Simulated {kind} ({nonce:08x})",
            "plan": plan,
            "caller_ids": account.numbers,
            "products": products,
        }
        if plan == "service_agreement":
            body["valid_until"] = valid_until
        for _ in range(20):  # PINs are unique across all accounts: try another on a clash
            account.pin = f"{rng.randrange(10**7, 10**8)}"
            status, answer = await meterd.admin(
                "POST", "/admin/accounts", {**body, "pin": account.pin}
            )
            if status == 201 or status not in (409,) or "pin" not in str(answer).lower():
                break
        if status != 201:
            raise SetupFailed(f"POST /admin/accounts {kind}: {status} {answer}")
        account.currency = answer.get("currency", "USD")
        if minutes:
            status, answer = await meterd.admin(
                "POST",
                f"/admin/accounts/{account.account_id}/minutes",
                {"minutes": minutes, "reference": "simulator-stock"},
            )
            if status not in (200, 201):
                raise SetupFailed(f"granting minutes to {account.account_id}: {status} {answer}")
        if deposit:
            status, answer = await meterd.admin(
                "POST",
                f"/admin/accounts/{account.account_id}/deposits",
                {"amount_minor": deposit, "reference": "simulator-stock"},
            )
            if status not in (200, 201):
                raise SetupFailed(f"deposit to {account.account_id}: {status} {answer}")
        status, view = await meterd.admin("GET", f"/admin/accounts/{account.account_id}")
        if status != 200:
            raise SetupFailed(f"GET /admin/accounts/{account.account_id}: {status} {view}")
        account.initial_bank, account.initial_deposit = view["bank_minutes"], view["deposit_minor"]
        accounts[kind] = account
    return accounts


async def read_prices(meterd: Meterd, currency: str, increment_seconds: int) -> Prices:
    """The per-minute rate and incident price in force now, from GET /admin/rates."""
    status, body = await meterd.admin("GET", "/admin/rates")
    if status != 200:
        raise SetupFailed(f"GET /admin/rates: {status} {body}")
    now = dt.datetime.now(dt.UTC)
    found: dict[str, tuple[dt.datetime, int]] = {}
    for rate in body["rates"]:
        if rate["currency"] not in ("*", currency):
            continue
        since = (
            dt.datetime.min.replace(tzinfo=dt.UTC)
            if rate["effective_from"] is None
            else dt.datetime.fromisoformat(rate["effective_from"])
        )
        if since <= now and (rate["kind"] not in found or since >= found[rate["kind"]][0]):
            found[rate["kind"]] = (since, rate["amount_minor"])
        if now - dt.timedelta(hours=2) < since:
            print(
                f"warning: a {rate['kind']} rate changes at {since.isoformat()}; calls near it "
                "may be priced otherwise than expected",
                file=sys.stderr,
            )
    return Prices(found["per_agent_minute"][1], found["incident"][1], increment_seconds)


# --- playing a call ----------------------------------------------------------------------------


@dataclass
class Step:
    due: float  # wall seconds after the call was placed
    rank: float  # order among steps due at the same moment
    route: str  # /twilio/conference, /twilio/call-status, /agents/research, /agents/waiver
    payload: dict[str, Any]
    what: str
    twins: list[Step] = field(default_factory=list)  # duplicates sent at the same moment


@dataclass
class Options:
    duplicates: bool
    reorder: bool
    time_scale: float
    settle_delay: int
    waiver_reason: str


def conference_steps(call: PlannedCall, options: Options) -> tuple[list[Step], list[Step]]:
    """The conference and call-status callbacks of a connected call, in Twilio's order, split
    into those before the hang-up and those of the hang-up itself."""
    events: list[tuple[int, int, str, dict[str, str]]] = []  # (offset, order, event, extra)
    customer = call.legs[0]
    events.append((0, 0, "conference-start", {}))
    events.append(
        (0, 1, "participant-join", _participant_fields(customer.sid, "customer", held=False))
    )
    for leg in call.legs:
        if leg.who != "customer":
            fields = _participant_fields(leg.sid, leg.label, held=False)
            events.append((leg.join, 2, "participant-join", fields))
        for start, stop in leg.holds:
            events.append(
                (start, 3, "participant-hold", _participant_fields(leg.sid, leg.label, held=True))
            )
            if stop is not None:
                fields = _participant_fields(leg.sid, leg.label, held=False)
                events.append((stop, 3, "participant-unhold", fields))
        held_at_leave = any(s < leg.leave and e is None for s, e in leg.holds)
        fields = _participant_fields(leg.sid, leg.label, held=held_at_leave)
        fields |= {
            "ParticipantCallStatus": "completed",
            "ReasonParticipantLeft": "participant_hung_up"
            if leg.who == "customer" or leg.leave < call.end
            else "conference_ended_via_api",
        }
        order = 4 if leg.who == "customer" else 5  # the customer's exit ends the conference
        events.append((leg.leave, order, "participant-leave", fields))
    events.append(
        (
            call.end,
            6,
            "conference-end",
            {
                "CallSidEndingConference": customer.sid,
                "ParticipantLabelEndingConference": "customer",
                "ReasonConferenceEnded": "participant-with-end-conference-on-exit-left",
                "Reason": f"Participant {customer.sid} with label customer left the conference",
            },
        )
    )
    events.sort(key=lambda e: (e[0], e[1]))
    before, ending = [], []
    scale = options.time_scale
    for sequence, (offset, _, event, extra) in enumerate(events, start=1):
        params = {
            "AccountSid": ACCOUNT_SID,
            "ConferenceSid": call.conference_sid,
            "FriendlyName": call.call_sid,
            "StatusCallbackEvent": event,
            "SequenceNumber": str(sequence),
            "Timestamp": rfc2822(call.base + offset),
            **extra,
        }
        step = Step(offset * scale, sequence, "/twilio/conference", params, f"{event} #{sequence}")
        (ending if offset == call.end else before).append(step)
    ending.append(hang_up_step(call, options, rank=len(events) + 1))
    return before, ending


def hang_up_step(call: PlannedCall, options: Options, rank: float) -> Step:
    params = _call_fields(call.call_sid, call.from_number, "completed") | {
        "CallbackSource": "call-progress-events",
        "SequenceNumber": "0",
        "Timestamp": rfc2822(call.base + call.end),
        "CallDuration": str(call.end),
        "Duration": str(-(-call.end // 60)),
    }
    return Step(call.end * options.time_scale, rank, "/twilio/call-status", params, "completed")


def plan_steps(call: PlannedCall, options: Options, rng: random.Random) -> list[Step]:
    """Every request of the call after the voice webhook, with when and in which order."""
    scale = options.time_scale
    if call.kind != "connected":
        return [hang_up_step(call, options, 0)]
    before, ending = conference_steps(call, options)
    end_due = call.end * scale
    middle = []
    for mark in call.research:  # the agent's tool sends the interval once it is over
        middle.append(
            Step(
                mark.end * scale,
                0,
                "/agents/research",
                {
                    "call_sid": call.call_sid,
                    "agent_id": mark.agent,
                    "start": iso(call.base + mark.start),
                    "end": iso(call.base + mark.end),
                },
                f"research {mark.agent} {mark.start}-{mark.end}",
            )
        )
    if call.waive == "during":
        agent = next(leg.who for leg in call.legs if leg.who != "customer")
        at = rng.randint(1, call.end)
        body = {"call_sid": call.call_sid, "agent_id": agent, "reason": options.waiver_reason}
        middle.append(Step(at * scale, 0, "/agents/waiver", body, "waiver"))
    if call.research_after_hang_up:  # starts as the caller hangs up, before meterd hears of it
        body = {
            "call_sid": call.call_sid,
            "agent_id": call.research_after_hang_up,
            "action": "start",
        }
        middle.append(Step(end_due, 0, "/agents/research", body, "research start"))
    # Phases: what shapes the timeline, then the agents' requests, then the hang-up itself.
    for phase, steps in enumerate((before, middle, ending)):
        if options.reorder:
            rng.shuffle(steps)
        for position, step in enumerate(steps):
            step.rank = phase * 1_000_000 + position
            if options.reorder and scale:
                limit = end_due if phase < 2 else end_due + min(2.0, options.settle_delay / 3)
                step.due = min(step.due + rng.uniform(0, 3.0 * scale + 0.5), limit)
            elif phase == 2:
                step.due = end_due
    steps = before + middle + ending
    if options.duplicates:
        for step in list(steps):
            if rng.random() >= 0.25:
                continue
            copy = dataclasses.replace(
                step, payload=dict(step.payload), what=step.what + " (dup)", twins=[]
            )
            if rng.random() < 0.5:  # a retry racing its original
                step.twins.append(copy)
                continue
            if step.route.startswith("/agents/"):  # the agents' tool retried, before the hang-up
                copy.rank = rng.uniform(step.rank + 0.1, 1_999_999)
                copy.due = min(step.due + rng.uniform(0, 1), end_due)
            else:  # Twilio retried: it may come after the hang-up, even after settlement
                copy.rank = step.rank + rng.uniform(0.1, 3_000_000)
                copy.due = step.due + rng.uniform(0, 2 * scale + 0.2)
            steps.append(copy)
    steps.sort(key=lambda s: (s.due, s.rank))
    return steps


async def place_call(
    meterd: Meterd, call: PlannedCall, options: Options, rng: random.Random
) -> None:
    """Play one call against meterd; whatever meterd refuses goes into `call.problems`."""
    try:
        if not await _play(meterd, call, options, rng):
            call.aborted = True
    except Exception as error:  # a bug here must not hide the other calls' results
        call.problems.append(f"simulator error: {type(error).__name__}: {error}")
        call.aborted = True
    finally:
        call.finished = True


async def _play(meterd: Meterd, call: PlannedCall, options: Options, rng: random.Random) -> bool:
    started = time.monotonic()
    scale = options.time_scale
    shift = options.settle_delay + 2 if scale == 0 else 0
    call.base = int(time.time() - call.end * (1 - scale)) - shift
    steps = plan_steps(call, options, rng)  # after base: payloads carry timestamps

    voice = _call_fields(call.call_sid, call.from_number, "ringing")
    twiml = await _voice_request(meterd, call, "/twilio/voice", voice, options.duplicates, rng)
    if twiml is None:
        return False
    if call.kind == "menu_pin" or call.pin_entry:
        gather = _element(twiml, "Gather")
        if gather is None:
            call.problems.append(f"voice: expected the PIN prompt, got {_squash(twiml)}")
            return False
        if call.pin_entry:
            attempts = ["12", call.account.pin] if call.wrong_pin_first else [call.account.pin]
            for digits in attempts:
                gather = _element(twiml, "Gather")
                if gather is None:
                    call.problems.append(f"PIN: expected another prompt, got {_squash(twiml)}")
                    return False
                path = _local_path(meterd, gather.get("action", ""))
                params = _call_fields(call.call_sid, call.from_number, "in-progress")
                params |= {"Digits": digits, "FinishedOnKey": "#"}
                twiml = await _voice_request(meterd, call, path, params, options.duplicates, rng)
                if twiml is None:
                    return False
    if call.kind != "menu_pin":
        conference = _element(twiml, "Conference")
        if conference is None or (conference.text or "").strip() != call.call_sid:
            call.problems.append(f"voice: expected the conference, got {_squash(twiml)}")
            return False

    live: Research | None = None  # research started after the hang-up, by the server's clock
    for step in steps:
        wait = started + step.due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        sent = [step, *step.twins]
        results = await asyncio.gather(*(_send(meterd, s) for s in sent))
        for one, (status, answer) in zip(sent, results, strict=True):
            if not 200 <= status < 300:
                call.problems.append(f"{one.route} {one.what}: {status} {_squash(answer)}")
            elif one is step and step.payload.get("action") == "start":
                open_marks = [r for r in answer.get("research", []) if r["end"] is None]
                if open_marks:
                    start = _epoch(open_marks[-1]["start"])
                    live = Research(call.research_after_hang_up, start, start)
    if call.research_after_hang_up:
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        body = {
            "call_sid": call.call_sid,
            "agent_id": call.research_after_hang_up,
            "action": "stop",
        }
        status, answer = await meterd.agents("/agents/research", body)
        if status != 200 or live is None:
            call.problems.append(f"research stop: {status} {_squash(answer)}")
            return False
        for recorded in answer["research"]:
            if _epoch(recorded["start"]) == live.start and recorded["end"]:
                live.end = _epoch(recorded["end"])
        call.research.append(Research(live.agent, live.start - call.base, live.end - call.base))
    return True


async def _send(meterd: Meterd, step: Step) -> tuple[int, Any]:
    if step.route.startswith("/twilio/"):
        if step.what.endswith("(dup)"):
            meterd.stats.duplicates += 1
        return await meterd.twilio(step.route, step.payload)
    return await meterd.agents(step.route, step.payload)


async def _voice_request(
    meterd: Meterd,
    call: PlannedCall,
    path: str,
    params: dict[str, str],
    duplicates: bool,
    rng: random.Random,
) -> str | None:
    """A TwiML webhook; with duplicates, sometimes sent twice at once (both must agree)."""
    twice = duplicates and rng.random() < 0.2
    if twice:
        meterd.stats.duplicates += 1
    answers = await asyncio.gather(*(meterd.twilio(path, params) for _ in range(1 + twice)))
    for status, text in answers:
        if status != 200:
            call.problems.append(f"{path}: {status} {_squash(text)}")
            return None
    if twice and _squash(answers[0][1]) != _squash(answers[1][1]):
        call.problems.append(f"{path} delivered twice gave two answers: {answers!r}"[:300])
    return answers[0][1]


def _element(twiml: str, tag: str) -> ElementTree.Element | None:
    try:
        root = ElementTree.fromstring(twiml)  # noqa: S314 - TwiML of the meterd under test
    except ElementTree.ParseError:
        return None
    return next(root.iter(tag), None)


def _local_path(meterd: Meterd, url: str) -> str:
    """Twilio requests the URL in the TwiML; here it reaches meterd at `base_url`."""
    if url.startswith(meterd.public_base_url):
        return url[len(meterd.public_base_url) :]
    return url


def _epoch(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp())


def _squash(value: Any) -> str:
    return " ".join(str(value).split())[:240]


# --- reading results back ----------------------------------------------------------------------


async def verify_call(
    meterd: Meterd, call: PlannedCall, prices: Prices, options: Options
) -> list[str] | None:
    """None while meterd has not settled the call; else its differences (empty: it matched)."""
    status, view = await meterd.admin("GET", f"/admin/calls/{call.call_sid}")
    if status != 200:
        return None if status == 0 else [f"GET /admin/calls: {status} {_squash(view)}"]
    if not view.get("settled_at"):
        return None
    if call.waive == "after" and not call.waived_after:
        agent = next((leg.who for leg in call.legs if leg.who != "customer"), "alice")
        body = {"call_sid": call.call_sid, "agent_id": agent, "reason": options.waiver_reason}
        status, answer = await meterd.agents("/agents/waiver", body)
        call.waived_after = True
        if status != 200:
            return [f"waiver after settlement: {status} {_squash(answer)}"]
        status, view = await meterd.admin("GET", f"/admin/calls/{call.call_sid}")
        if status != 200:
            return [f"GET /admin/calls after the waiver: {status} {_squash(view)}"]
    call.observed = view
    expected = expect(call, prices)
    problems = compare(call, expected, view, prices.rate_minor)
    if not call.waive and call.kind == "connected":
        minutes = sum(a["agent_minutes"] for a in expected["agents"].values())
        used = await _ledger_minutes_used(meterd, call.call_sid)
        if used != minutes:
            problems.append(f"ledger: system:minutes:used moved {used}, expected {minutes}")
    return problems


async def _ledger_minutes_used(meterd: Meterd, call_sid: str) -> int | str:
    total, after = 0, 0
    while True:
        status, page = await meterd.admin(
            "GET", f"/admin/ledger?call_sid={call_sid}&limit=500&after_id={after}"
        )
        if status != 200:
            return f"GET /admin/ledger: {status}"
        for transaction in page["transactions"]:
            for posting in transaction["postings"]:
                if posting["book"] == "system:minutes:used":
                    total += posting["amount"]
        if page.get("next_after_id") is None:
            return total
        after = page["next_after_id"]


async def check_accounts(
    meterd: Meterd, accounts: Mapping[str, SimAccount], calls: list[PlannedCall], prices: Prices
) -> list[str]:
    """Each account moved by exactly what its calls were charged; per_minute money only in
    whole agent-minutes; the bank-then-deposit account's calls together paid their minutes."""
    problems = []
    for account in accounts.values():
        status, view = await meterd.admin("GET", f"/admin/accounts/{account.account_id}")
        if status != 200:
            problems.append(f"{account.account_id}: GET {status} {_squash(view)}")
            continue
        mine = [c for c in calls if c.account is account and c.observed is not None]
        bank_used = sum(c.observed["charges"]["bank_minutes"] for c in mine)
        money_used = sum(c.observed["charges"]["deposit_minor"] for c in mine)
        if account.initial_bank - view["bank_minutes"] != bank_used:
            problems.append(
                f"{account.account_id}: bank went {account.initial_bank} -> "
                f"{view['bank_minutes']}, its calls show {bank_used} minutes"
            )
        if account.initial_deposit - view["deposit_minor"] != money_used:
            problems.append(
                f"{account.account_id}: deposit went {account.initial_deposit} -> "
                f"{view['deposit_minor']}, its calls show {money_used}"
            )
        if account.kind == "mixed" and bank_used > account.initial_bank:
            problems.append(
                f"{account.account_id}: used {bank_used} banked minutes of {account.initial_bank}"
            )
    return problems


# --- progress and summary ----------------------------------------------------------------------


class Progress:
    """rich's progress bar when rich is installed, else a plain line on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.placed = self.settled = self.differing = 0
        self._rich: Any = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from rich.progress import Progress as RichProgress  # type: ignore[import-not-found]
        except ImportError:
            return
        self._rich = RichProgress(transient=False)
        self._placed_task = self._rich.add_task("calls placed", total=total)
        self._settled_task = self._rich.add_task("calls settled and checked", total=total)
        self._rich.start()

    def update(self, *, placed: int, settled: int, differing: int) -> None:
        self.placed, self.settled, self.differing = placed, settled, differing
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._placed_task, completed=placed)
            self._rich.update(self._settled_task, completed=settled)
            return
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if now - self._last < (0.2 if tty else 5.0) and settled < self.total:
            return
        self._last = now
        width = 30
        filled = int(width * settled / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] placed {placed}/{self.total}, "
            f"settled and checked {settled}/{self.total}, differing {differing}"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def print_summary(rows: list[tuple[str, ...]], header: tuple[str, ...], title: str) -> None:
    try:
        from rich.console import Console  # type: ignore[import-not-found]
        from rich.table import Table  # type: ignore[import-not-found]
    except ImportError:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        print(f"\n{title}")
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
        print(line)
        print("  ".join("-" * w for w in widths))
        for row in rows:
            cells = [
                (str(c).ljust(w) if i == 0 else str(c).rjust(w))
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            print("  ".join(cells))
        return
    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console().print(table)


# --- the run -----------------------------------------------------------------------------------


async def simulate(
    base_url: str,
    *,
    calls: int,
    cps: float,
    agents_max: int = 3,
    duplicates: bool = False,
    reorder: bool = False,
    time_scale: float = 0.0,
    twilio_auth_token: str,
    public_base_url: str,
    admin_token: str,
    agents_token: str,
    seed: int,
    progress: bool = True,
    settle_delay: int = 300,
    increment_seconds: int = 60,
    max_call_seconds: int = 900,
    settle_timeout: float | None = None,
    concurrency: int = 64,
    waiver_reason: str = "software_defect",
    out: Callable[[str], None] = print,
) -> int:
    """Run the simulation; 0 if every call matched, 1 with differences, 2 if it could not run."""
    if calls < 1 or cps <= 0 or not 1 <= agents_max <= len(AGENT_NAMES) or time_scale < 0:
        out("simulate: need calls >= 1, cps > 0, 1 <= agents_max <= 10, time_scale >= 0")
        return EXIT_CANNOT_RUN
    missing = [
        name
        for name, value in (
            ("twilio auth token", twilio_auth_token),
            ("admin token", admin_token),
            ("agents token", agents_token),
        )
        if not value
    ]
    if missing:
        out(
            f"simulate: missing {', '.join(missing)}: give them, or the daemon's state "
            f"directory (--state-dir), whose secrets/ holds them (see --help)"
        )
        return EXIT_CANNOT_RUN
    rng = random.Random(seed)
    nonce = int.from_bytes(os.urandom(4), "big")
    options = Options(duplicates, reorder, time_scale, settle_delay, waiver_reason)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        meterd = Meterd(
            session,
            base_url,
            public_base_url or base_url,
            twilio_auth_token=twilio_auth_token,
            admin_token=admin_token,
            agents_token=agents_token,
            concurrency=concurrency,
        )
        try:
            accounts = await set_up_accounts(meterd, rng, nonce, calls)
            prices = await read_prices(meterd, accounts["bank"].currency, increment_seconds)
        except (SetupFailed, aiohttp.ClientError, OSError, KeyError) as error:
            out(f"simulate: cannot set up at {base_url}: {error}")
            return EXIT_CANNOT_RUN
        planned = plan_calls(
            rng,
            accounts,
            calls=calls,
            agents_max=agents_max,
            max_call_seconds=max_call_seconds,
            nonce=nonce,
        )
        call_rngs = [random.Random(rng.getrandbits(64)) for _ in planned]
        bar = Progress(calls, progress)
        results: dict[str, list[str]] = {}
        started = time.monotonic()

        async def place_all() -> None:
            tasks = []
            for index, call in enumerate(planned):
                wait = started + index / cps - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                tasks.append(
                    asyncio.create_task(place_call(meterd, call, options, call_rngs[index]))
                )
            await asyncio.gather(*tasks)

        checking_slots = asyncio.Semaphore(8)  # reading back must not crowd out the traffic

        async def verify(call: PlannedCall) -> list[str] | None:
            async with checking_slots:
                return await verify_call(meterd, call, prices, options)

        placing = asyncio.create_task(place_all())
        longest = max(c.end for c in planned) * time_scale
        deadline_after = (settle_timeout or settle_delay + 120) + longest
        delivered_at: float | None = None
        while True:
            if placing.done() and delivered_at is None:
                delivered_at = time.monotonic()
                placing.result()
            ready = [c for c in planned if c.finished and c.call_sid not in results]
            for call in ready:
                if call.aborted:
                    results[call.call_sid] = list(call.problems)
            checking = [c for c in ready if not c.aborted]
            checks = await asyncio.gather(*(verify(c) for c in checking))
            for call, differences in zip(checking, checks, strict=True):
                if differences is not None:
                    results[call.call_sid] = call.problems + differences
            bar.update(
                placed=sum(c.finished for c in planned),
                settled=len(results),
                differing=sum(bool(p) for p in results.values()),
            )
            if len(results) == len(planned):
                break
            if delivered_at is not None and time.monotonic() - delivered_at > deadline_after:
                for call in planned:
                    results.setdefault(call.call_sid, [*call.problems, "not settled in time"])
                break
            await asyncio.sleep(1.0)
        settled_at = time.monotonic()
        bar.close()
        account_problems = await check_accounts(meterd, accounts, planned, prices)

    differing = {sid: p for sid, p in results.items() if p}
    _summarise(
        out,
        planned,
        meterd.stats,
        prices,
        delivery_seconds=(delivered_at or settled_at) - started,
        total_seconds=settled_at - started,
        results=results,
        options=options,
        seed=seed,
        cps=cps,
    )
    if differing or account_problems:
        out(f"\nDIFFERENCES in {len(differing)} of {len(planned)} calls:")
        by_sid = {c.call_sid: c for c in planned}
        for shown, (sid, problems) in enumerate(sorted(differing.items())):
            call = by_sid[sid]
            out(f"- {sid} [{call.describe()}]")
            for problem in problems:
                out(f"    {problem}")
            if shown >= 49:
                out(f"  ... and {len(differing) - 50} more calls")
                break
        for problem in account_problems:
            out(f"- account {problem}")
        out(f"reproduce the scenario with --seed {seed}")
        return EXIT_DIFFERENCES
    out(f"\nOK: all {len(planned)} calls matched the expectation (seed {seed}).")
    return EXIT_OK


def _summarise(
    out: Callable[[str], None],
    planned: list[PlannedCall],
    stats: Stats,
    prices: Prices,
    *,
    delivery_seconds: float,
    total_seconds: float,
    results: Mapping[str, list[str]],
    options: Options,
    seed: int,
    cps: float,
) -> None:
    header = ("account / calls", "calls", "agent-min", "bank min", "deposit", "incidents", "diff")
    rows: list[tuple[str, ...]] = []
    for kind in ("bank", "deposit", "mixed", "agreement", "incident"):
        mine = [c for c in planned if c.account.kind == kind]
        seen = [c.observed for c in mine if c.observed]
        expected_minutes = sum(
            a["agent_minutes"] for c in mine for a in expect(c, prices)["agents"].values()
        )
        meterd_minutes = sum(a["agent_minutes"] for v in seen for a in v["agents"].values())
        rows.append(
            (
                f"{kind} ({mine[0].account.plan})" if mine else kind,
                str(len(mine)),
                f"{meterd_minutes}/{expected_minutes}",
                str(sum(v["charges"]["bank_minutes"] for v in seen)),
                f"{sum(v['charges']['deposit_minor'] for v in seen) / 100:,.2f}",
                str(sum(v["charges"]["incidents"] for v in seen)),
                str(sum(1 for c in mine if results.get(c.call_sid))),
            )
        )
    kinds = Counter(c.kind for c in planned)
    rows.append(
        (
            "connected (PIN callers)",
            f"{kinds['connected']} ({sum(c.pin_entry for c in planned)})",
            "",
            "",
            "",
            "",
            "",
        )
    )
    rows.append(
        ("hung up in the menu", str(kinds["menu_pin"] + kinds["menu_early"]), "", "", "", "", "")
    )
    rows.append(
        (
            "with research / waived",
            f"{sum(bool(c.research) for c in planned)} / {sum(bool(c.waive) for c in planned)}",
            "",
            "",
            "",
            "",
            "",
        )
    )
    print_summary(
        rows, header, f"meterd simulation: {len(planned)} calls (agent-min: meterd/expected)"
    )
    latencies = [s * 1000 for s in stats.latencies]
    facts = [
        ("seed", str(seed)),
        ("new calls per second", f"{cps:g}"),
        ("duplicates / reorder", f"{options.duplicates} / {options.reorder}"),
        ("time scale", f"{options.time_scale:g} (0: synthetic timestamps, no waiting)"),
        (
            "webhooks sent (of them duplicates)",
            f"{sum(stats.webhooks.values())} ({stats.duplicates})",
        ),
        ("agent and admin requests", f"{stats.agent_requests} / {stats.admin_requests}"),
        ("HTTP statuses", ", ".join(f"{k}: {v}" for k, v in sorted(stats.statuses.items()))),
        ("connection failures", str(stats.failures)),
        (
            "webhook latency p50 / p99 / max",
            f"{_percentile(latencies, 0.5):.1f} / {_percentile(latencies, 0.99):.1f} / "
            f"{max(latencies, default=float('nan')):.1f} ms",
        ),
        ("delivery / until all settled", f"{delivery_seconds:.1f} s / {total_seconds:.1f} s"),
        ("calls with differences", str(sum(bool(p) for p in results.values()))),
    ]
    print_summary(facts, ("figure", "value"), "run")


# --- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's options (also used by `meterd simulate`)."""
    env = os.environ
    parser.add_argument(
        "--url",
        default=None,
        help="meterd's address (default: from settings, else http://127.0.0.1:8080)",
    )
    parser.add_argument("--calls", type=int, default=200, help="how many calls (default 200)")
    parser.add_argument("--cps", type=float, default=20.0, help="new calls per second (default 20)")
    parser.add_argument("--agents-max", type=int, default=3, help="agents per call, 1 to N (3)")
    parser.add_argument("--duplicates", action="store_true", help="deliver some requests twice")
    parser.add_argument("--reorder", action="store_true", help="shuffle each call's callbacks")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="wall seconds per call second: 0 = synthetic timestamps in the recent past, no "
        "waiting (default); 1 = real time",
    )
    parser.add_argument("--seed", type=int, default=None, help="scenario seed (default: random)")
    parser.add_argument("--max-call-seconds", type=int, default=900, help="longest call (900)")
    parser.add_argument(
        "--settle-delay",
        type=int,
        default=None,
        help="meterd's settle_delay_seconds (default: settings, else "
        "$METERD_SETTLE_DELAY_SECONDS, else 300); calls are placed this far in the past",
    )
    parser.add_argument(
        "--increment-seconds",
        type=int,
        default=None,
        help="meterd's "
        "increment_seconds (default: settings, else $METERD_INCREMENT_SECONDS, else 60)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=None,
        help="seconds to wait for "
        "settlement after the last call was placed (default: settle delay + 120)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (64)")
    parser.add_argument(
        "--waiver-reason",
        default=None,
        help="a reason meterd accepts (default: the first of waiver_reasons, else software_defect)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the daemon's state directory: tokens not given are read from DIR/secrets/<name> "
        "(default: the state_dir setting under `meterd simulate`)",
    )
    for name, use in (
        ("twilio_auth_token", "signs the webhooks, as the daemon's"),
        ("admin_token", "for /admin/*"),
        ("agents_token", "for /agents/*"),
    ):
        variable = f"METERD_{name.upper()}"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=env.get(variable),
            metavar="TOKEN",
            help=f"{use} (default: ${variable}, else DIR/secrets/{name})",
        )
    parser.add_argument(
        "--public-base-url",
        default=env.get("METERD_PUBLIC_BASE_URL"),
        metavar="URL",
        help="the URL the daemon checks signatures against (default: "
        "$METERD_PUBLIC_BASE_URL, else the public_base_url setting, else --url)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _token_file(state_dir: Path | None, name: str) -> str | None:
    if state_dir is None:
        return None
    path = state_dir / "secrets" / name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def run_parsed(args: argparse.Namespace, settings: Any = None) -> int:
    """Run with parsed options; `settings` (meterd.config.Settings, from `meterd simulate`)
    gives the defaults: address, public URL, tokens, settle delay, increment."""
    env = os.environ

    def setting(name: str, fallback: Any) -> Any:
        if settings is not None:
            with contextlib.suppress(AttributeError):
                return getattr(settings, name)
        return fallback

    def token(name: str, given: str | None) -> str:
        """Given (option or environment), else the file in --state-dir, else the settings'
        (credentials, generated file), else a file in the settings' state directory."""
        return (
            given
            or _token_file(args.state_dir, name)
            or (settings.secret(name) if settings is not None else None)
            or _token_file(settings.state_dir if settings is not None else None, name)
            or ""
        )

    if args.url:
        url = args.url
    elif settings is not None:
        host = (
            settings.listen_host
            if settings.listen_host not in ("0.0.0.0", "::", "")  # noqa: S104 - a comparison
            else "127.0.0.1"
        )
        url = f"http://{host}:{settings.listen_port}"
    else:
        url = "http://127.0.0.1:8080"
    settle_delay = args.settle_delay
    if settle_delay is None:
        settle_delay = int(
            setting("settle_delay_seconds", env.get("METERD_SETTLE_DELAY_SECONDS", 300))
        )
    increment = args.increment_seconds
    if increment is None:
        increment = int(setting("increment_seconds", env.get("METERD_INCREMENT_SECONDS", 60)))
    reasons = setting("waiver_reasons", None)
    waiver_reason = args.waiver_reason or (reasons[0] if reasons else "software_defect")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    public_base_url = args.public_base_url or (settings.public_base_url if settings else "") or url
    return asyncio.run(
        simulate(
            url,
            calls=args.calls,
            cps=args.cps,
            agents_max=args.agents_max,
            duplicates=args.duplicates,
            reorder=args.reorder,
            time_scale=args.time_scale,
            twilio_auth_token=token("twilio_auth_token", args.twilio_auth_token),
            public_base_url=public_base_url,
            admin_token=token("admin_token", args.admin_token),
            agents_token=token("agents_token", args.agents_token),
            seed=seed,
            progress=not args.no_progress,
            settle_delay=settle_delay,
            increment_seconds=increment,
            max_call_seconds=args.max_call_seconds,
            settle_timeout=args.settle_timeout,
            concurrency=args.concurrency,
            waiver_reason=waiver_reason,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meterd.simulate",
        description="Drive a running meterd with signed simulated Twilio traffic and check "
        "every call's charges against the rules.",
    )
    add_arguments(parser)
    try:
        return run_parsed(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
