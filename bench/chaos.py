"""Chaos: the real daemon is killed with SIGKILL at random moments, N times, while calls are
metered live and Twilio's callbacks are retried; afterwards every minute of every call is checked
against what its script says it must cost.

    .venv/bin/python -m bench.chaos [--kills 100] [--concurrent-calls 10] [--call-seconds 60-240]
        [--head-start 0-30] [--up-seconds 0.5-4] [--database-url postgresql+asyncpg://...]
        [--seed N] [--keep] [--no-append]

One `meterd run` (SQLite in a temporary state directory, or `--database-url`) with two accounts:
one paying from banked minutes (the licence's included minutes and a grant), one from a prepaid
deposit. Calls are placed all along, `concurrent-calls` at a time, each a scripted timeline of
1 to 4 minutes by Twilio's timestamps (`call-seconds`): the customer, 1 to 3 agents joining at
various moments, holds of the customer and of agents, an agent dropping and dialling back in. A
call is placed `head-start` seconds into its life (that part's callbacks are sent at once, its
timestamps in the past) and the rest is played in real time: each callback is sent when its
moment comes, so live metering (minute n posted once an agent's billable time passes
(n - 1) x 60 s) runs against Twilio's clock and ours. Each callback (and the voice webhook) is
sent as Twilio sends status callbacks: one that meets a refused or reset connection, a timeout or
a 5xx is retried, on its own, until it gets a 2xx; the others go on meanwhile, so retried ones
arrive late and out of order.

Meanwhile the daemon runs for `up-seconds` (random), gets `kill -9` and is started again on the
same state directory and port; about one kill in ten lands during start-up instead (before the
daemon answers /healthz). After the N-th kill no new calls are placed (calls placed late are
shortened so that they end about when the kills do); once every call has ended and settled
(`settle_delay_seconds` 8: longer than any retry takes here) the daemon is stopped and checked:

- every call's view (`GET /admin/calls/{sid}`) equals the expectation worked out second by second
  from its script (`meterd.simulate.expectation.expect`: active, billable and hold seconds,
  agent-minutes = billable seconds rounded up per 60 s increment, charges from the bank or the
  deposit);
- lost: an event answered 2xx that is not in `webhook_events`, or a minute of the expectation
  (call, agent, n) with no standing ledger transaction;
- repeated: an event stored more than once (or stored with other content), or a minute standing
  more than once or beyond the expectation;
- each call's net `system:minutes:used` and "minutes posted" markers equal the expectation, each
  account's balance its calls' total, and `meterd ledger check` passes;
- the daemon never exited on its own, always came back healthy, and logged no error.

The summary line (`kills=N calls=M lost=0 repeated=0 ledger check OK`) is printed and appended to
bench/RESULTS.md with the machine and date; the exit status is 1 on any mismatch.
tests/e2e/test_chaos.py runs the same code with 3 kills and 3 short calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select

from bench.ingest import METERD, PUBLIC_BASE_URL, TWILIO_TOKEN, MeterdProcess, report
from meterd.simulate.expectation import Prices, compare, expect
from meterd.simulate.playback import Options, conference_steps
from meterd.simulate.scenarios import AGENT_NAMES, Leg, PlannedCall, SimAccount
from meterd.simulate.wire import signed_form, voice_params
from meterd.store.database import open_database
from meterd.store.schema import (
    call_agent_minutes,
    calls,
    ledger_postings,
    ledger_transactions,
    webhook_events,
)

RATE_MINOR = 100
INCIDENT_MINOR = 5000
INCREMENT_SECONDS = 60
INCLUDED_MINUTES = 45
GRANTED_MINUTES = 1_000_000
DEPOSIT_MINOR = 10**9
REQUEST_TIMEOUT_SECONDS = 10
DELIVERY_DEADLINE_SECONDS = 120  # a callback still failing after this long is a failure
START_ATTEMPTS = 3
START_UP_NOTES = ("no twilio_account_sid", "no METERD_STRIPE_SECRET_KEY")  # expected here
MINUTE_KEY = re.compile(r"^call:(?P<sid>[^:]+):agent:(?P<agent>.+):minute:(?P<n>\d+)$")


@dataclass
class ChaosConfig:
    kills: int = 100
    concurrent_calls: int = 12
    call_seconds: tuple[int, int] = (60, 240)  # a call's length by Twilio's timestamps
    head_start: tuple[int, int] = (0, 30)  # how much of it had happened when it is placed
    live_seconds_min: int = 20  # a call placed late is shortened, never below this (real time)
    up_seconds: tuple[float, float] = (0.5, 4.0)  # the daemon's run between two kills
    startup_kill_share: float = 0.1  # kills that land during start-up instead
    aimed_kill_share: float = 0.5  # kills aimed at a minute or a settlement falling due
    agents_max: int = 3
    max_calls: int | None = None  # stop placing calls after this many
    settle_delay_seconds: int = 8
    settle_timeout_seconds: float = 180
    database_url: str | None = None  # None: SQLite in the state directory
    seed: int | None = None
    workdir: Path | None = None  # None: a temporary directory, removed unless the run failed
    keep: bool = False


@dataclass
class Delivery:
    """One webhook as Twilio sends it: retried until it gets a 2xx."""

    call_sid: str
    route: str  # /twilio/voice, /twilio/conference, /twilio/call-status
    params: dict[str, str]
    what: str
    attempts: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    status: int = 0
    answer: str = ""
    delivered_at: float | None = None  # wall clock of the 2xx

    @property
    def dedup_key(self) -> str:
        """The key meterd stores the event under (meterd/services/ingest.py, answering.py)."""
        p = self.params
        if self.route == "/twilio/voice":
            return f"voice:{p['CallSid']}"
        if self.route == "/twilio/conference":
            return f"conference:{p['ConferenceSid']}:{p['SequenceNumber']}"
        source = p.get("CallbackSource", "call-progress-events")
        return f"call:{p['CallSid']}:{source}:{p['SequenceNumber']}"


@dataclass
class Kill:
    at: float  # seconds since the chaos began
    phase: str  # "running" (after /healthz said 200), "aimed" (the same, timed) or "start-up"
    up_seconds: float


@dataclass
class ChaosResult:
    kills: int
    calls: int
    lost: int
    repeated: int
    ledger_check_ok: bool
    problems: list[str]
    stats: dict[str, Any]
    workdir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.lost == 0 and self.repeated == 0 and self.ledger_check_ok

    def summary(self) -> str:
        return (
            f"kills={self.kills} calls={self.calls} lost={self.lost} repeated={self.repeated} "
            f"ledger check {'OK' if self.ledger_check_ok else 'FAILED'}"
        )


# --- the calls ---------------------------------------------------------------------------------


def plan_call(
    rng: random.Random, index: int, nonce: int, account: SimAccount, length: int, agents_max: int
) -> PlannedCall:
    """A call of `length` seconds: the customer (maybe a hold), 1 to `agents_max` agents
    joining at various moments (maybe a hold, maybe dropping and dialling back in)."""
    call_sid = f"CA{nonce:08x}{index:016x}{0:08x}"
    call = PlannedCall(
        index=index,
        call_sid=call_sid,
        conference_sid="CF" + call_sid[2:],
        account=account,
        kind="connected",
        from_number=rng.choice(account.numbers),
        end=length,
    )
    legs = itertools.count(1)
    customer = Leg("customer", call_sid, 0, length)
    if length >= 40 and rng.random() < 0.4:
        start = rng.randint(5, length - 25)
        customer.holds.append((start, rng.randint(start + 3, min(length - 5, start + 50))))
    call.legs.append(customer)
    names = rng.sample(AGENT_NAMES[:5], rng.randint(1, agents_max))
    for k, name in enumerate(names):
        join = rng.randint(0, 5) if k == 0 else rng.randint(5, max(6, length * 2 // 3))
        join = min(join, length - 1)
        leave = length if rng.random() < 0.6 else rng.randint(min(join + 10, length), length)
        leg = Leg(name, f"{call_sid[:-8]}{next(legs):08x}", join, leave)
        if leave - join > 20 and rng.random() < 0.3:
            start = rng.randint(join + 2, leave - 10)
            leg.holds.append((start, rng.randint(start + 2, leave - 2)))
        call.legs.append(leg)
        if leave < length - 15 and rng.random() < 0.3:  # dropped, and dialled back in
            rejoin = rng.randint(leave + 1, length - 10)
            leg_sid = f"{call_sid[:-8]}{next(legs):08x}"
            call.legs.append(Leg(name, leg_sid, rejoin, rng.randint(rejoin + 1, length)))
    return call


def minute_due_offsets(call: PlannedCall) -> list[int]:
    """The offsets at which a minute of one of the call's agents falls due: the start of
    billable second (n - 1) x 60 of that agent (billable: in the conference with the customer,
    neither on hold), by the script."""
    customer = [leg for leg in call.legs if leg.who == "customer"]
    agents = sorted({leg.who for leg in call.legs} - {"customer"})
    billable: Counter[str] = Counter()
    due = []
    for t in range(call.end):
        if not any(leg.available(t) for leg in customer):
            continue
        for agent in agents:
            if any(leg.available(t) for leg in call.legs if leg.who == agent):
                if billable[agent] % INCREMENT_SECONDS == 0:
                    due.append(t)
                billable[agent] += 1
    return due


# --- the run -----------------------------------------------------------------------------------


class Chaos:
    def __init__(
        self, config: ChaosConfig, meterd: MeterdProcess, session: aiohttp.ClientSession
    ) -> None:
        self.config = config
        self.meterd = meterd
        self.session = session
        self.rng = random.Random(config.seed)  # the calls
        self.kill_rng = random.Random(f"{config.seed} kills")  # when and how meterd dies
        self.jitter = random.Random()  # pauses between retries
        self.nonce = random.SystemRandom().getrandbits(32)  # unique SIDs in a shared database
        self.accounts: dict[str, SimAccount] = {}
        self.calls: list[PlannedCall] = []
        self.deliveries: list[Delivery] = []
        self.tasks: set[asyncio.Task[None]] = set()  # calls being played, webhooks being sent
        self.kills: list[Kill] = []
        self.moments: list[float] = []  # wall clock: a minute or a settlement falls due
        self.restart_seconds: list[float] = []
        self.problems: list[str] = []
        self.started = time.monotonic()
        self.chaos_done = asyncio.Event()
        self.killing = False  # the process is down because we killed it

    # accounts ------------------------------------------------------------------------------

    def set_up_accounts(self) -> None:
        prefix = f"+1555{self.nonce % 10**6:06d}"
        for k, (kind, plan_products) in enumerate(
            (("bank", [{"product": "desktop", "kind": "license"}]), ("deposit", []))
        ):
            account = SimAccount(
                kind,
                f"chaos-{self.nonce:08x}-{kind}",
                "per_minute",
                [f"{prefix}{k}{n:02d}" for n in range(20)],
            )
            status, body = self.meterd.request(
                "POST",
                "/admin/accounts",
                {
                    "account_id": account.account_id,
                    "name": account.account_id,
                    "plan": "per_minute",
                    "caller_ids": account.numbers,
                    "products": plan_products,
                },
            )
            if status != 201:
                raise RuntimeError(f"creating {account.account_id}: {status} {body}")
            if kind == "bank":
                path, body = "minutes", {"minutes": GRANTED_MINUTES, "reference": "chaos"}
                account.initial_bank = INCLUDED_MINUTES + GRANTED_MINUTES
            else:
                path, body = "deposits", {"amount_minor": DEPOSIT_MINOR, "reference": "chaos"}
                account.initial_deposit = DEPOSIT_MINOR
            status, answer = self.meterd.request(
                "POST", f"/admin/accounts/{account.account_id}/{path}", body
            )
            if status != 201:
                raise RuntimeError(f"funding {account.account_id}: {status} {answer}")
            self.accounts[kind] = account

    # webhooks ------------------------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> None:
        """Send until a 2xx; a refused or lost connection, a timeout or a 5xx is retried."""
        body, headers = signed_form(PUBLIC_BASE_URL + delivery.route, delivery.params, TWILIO_TOKEN)
        deadline = time.monotonic() + DELIVERY_DEADLINE_SECONDS
        pause = 0.1
        while True:
            delivery.attempts += 1
            try:
                async with self.session.post(
                    self.meterd.base_url + delivery.route,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
                ) as response:
                    status, text = response.status, await response.text()
            except TimeoutError:
                failure = "timeout"
            except aiohttp.ClientError as error:
                failure = type(error).__name__
            else:
                if 200 <= status < 300:
                    delivery.status, delivery.answer = status, text
                    delivery.delivered_at = time.time()
                    return
                if status < 500:  # meterd refused it: retrying would not help
                    delivery.status, delivery.answer = status, text
                    self.problems.append(
                        f"{delivery.call_sid} {delivery.what}: {status} {' '.join(text.split())}"[
                            :400
                        ]
                    )
                    return
                failure = f"HTTP {status}"
            delivery.failures[failure] += 1
            if time.monotonic() > deadline:
                self.problems.append(
                    f"{delivery.call_sid} {delivery.what}: no 2xx after {delivery.attempts} "
                    f"attempts in {DELIVERY_DEADLINE_SECONDS} s ({dict(delivery.failures)})"
                )
                return
            await asyncio.sleep(pause * self.jitter.uniform(0.5, 1.5))
            pause = min(pause * 2, 1.0)

    async def play(self, call: PlannedCall, head_start: int) -> None:
        voice = Delivery(
            call.call_sid,
            "/twilio/voice",
            voice_params(call.call_sid, call.from_number),
            "voice",
        )
        self.deliveries.append(voice)
        await self.deliver(voice)
        if voice.status != 200:
            return
        if f">{call.call_sid}</Conference>" not in voice.answer:
            self.problems.append(f"{call.call_sid} voice: not connected: {voice.answer[:300]}")
            return
        # Twilio's clock: the call began `head_start` seconds ago (whole seconds, never ahead)
        call.base = int(time.time()) - head_start
        began = time.monotonic()
        self.moments += [call.base + t for t in minute_due_offsets(call) if t >= head_start]
        self.moments.append(call.base + call.end + self.config.settle_delay_seconds)
        before, ending = conference_steps(call, _OPTIONS)
        sending = []
        for step in sorted(before + ending, key=lambda s: (s.due, s.rank)):
            wait = began + step.due - head_start - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            delivery = Delivery(call.call_sid, step.route, step.payload, step.what)
            self.deliveries.append(delivery)
            sending.append(self._task(self.deliver(delivery)))
        await asyncio.gather(*sending)
        call.finished = True

    def _task(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _chaos_seconds_left(self) -> float:
        done = len(self.kills)
        if done:
            per_kill = (time.monotonic() - self.started) / done
        else:
            low, high = self.config.up_seconds
            per_kill = (low + high) / 2 + 1.5
        return (self.config.kills - done) * per_kill

    async def place_calls(self) -> None:
        config = self.config
        active: set[asyncio.Task[None]] = set()
        index = 0
        while not self.chaos_done.is_set() and (
            config.max_calls is None or index < config.max_calls
        ):
            while len(active) < config.concurrent_calls and (
                config.max_calls is None or index < config.max_calls
            ):
                length = self.rng.randint(*config.call_seconds)
                head = min(self.rng.randint(*config.head_start), length - 1)
                # end about when the kills do: shorten a call placed late (never below the
                # minimum live part)
                live = min(
                    length - head,
                    max(config.live_seconds_min, int(self._chaos_seconds_left())),
                )
                account = self.accounts[self.rng.choice(("bank", "deposit"))]
                call = plan_call(
                    self.rng, index, self.nonce, account, head + live, config.agents_max
                )
                index += 1
                self.calls.append(call)
                active.add(self._task(self.play(call, head)))
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            if active:
                done, _ = await asyncio.wait(
                    active, timeout=0.5, return_when=asyncio.FIRST_COMPLETED
                )
                active -= done
            else:
                await asyncio.sleep(0.2)
        await asyncio.gather(*active)

    # the daemon ---------------------------------------------------------------------------

    def _exited_by_itself(self) -> bool:
        process = self.meterd.process
        if process is None or process.poll() is None or self.killing:
            return False
        self.problems.append(
            f"meterd exited by itself with status {process.returncode}; log tail:\n"
            + self.meterd.log()[-3000:]
        )
        return True

    async def start(self) -> None:
        """Start again on the same state directory and port, until it answers /healthz."""
        for attempt in range(1, START_ATTEMPTS + 1):
            began = time.monotonic()
            try:
                await asyncio.to_thread(self.meterd.start, True, 60)
            except RuntimeError as error:
                self.problems.append(f"restart {attempt} failed: {str(error)[-3000:]}")
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.meterd.kill9)
                continue
            self.killing = False
            self.restart_seconds.append(time.monotonic() - began)
            return
        raise RuntimeError("meterd could not be started again; see the problems")

    async def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._exited_by_itself():
                self.killing = True
                await self.start()
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def kill(self, phase: str, up: float) -> None:
        self.killing = True
        await asyncio.to_thread(self.meterd.kill9)
        self.kills.append(Kill(time.monotonic() - self.started, phase, up))
        assert self.meterd.process is not None
        if self.meterd.process.returncode != -signal.SIGKILL:  # it had exited before
            self.problems.append(
                f"meterd had exited by itself ({phase}) with status "
                f"{self.meterd.process.returncode}; log tail:\n{self.meterd.log()[-3000:]}"
            )

    async def kill_loop(self) -> None:
        config = self.config
        try:
            for k in range(config.kills):
                # the same draws every time, so a seed gives the same kinds of kill
                in_start_up = k > 0 and self.kill_rng.random() < config.startup_kill_share
                start_up = self.kill_rng.uniform(0.05, 0.6)
                up = self.kill_rng.uniform(*config.up_seconds)
                aimed = self.kill_rng.random() < config.aimed_kill_share
                after_due = self.kill_rng.uniform(0.0, 1.2)
                if in_start_up:
                    await asyncio.to_thread(self.meterd.start, False)
                    await asyncio.sleep(start_up)
                    await self.kill("start-up", start_up)
                    continue
                if k > 0 and self.killing:
                    await self.start()
                phase = "running"
                if aimed:
                    # just after a minute or a settlement falls due: the tick (every second)
                    # is about to post it, is posting it, or has just done so
                    now = time.time()
                    latest = now + config.up_seconds[1]
                    ahead = [m for m in self.moments if now + 0.2 <= m <= latest]
                    if ahead:
                        up, phase = min(ahead) - now + after_due, "aimed"
                await self.run_for(up)
                await self.kill(phase, up)
            await self.start()
        finally:
            self.chaos_done.set()

    async def wait_settled(self) -> dict[str, dict[str, Any]]:
        views: dict[str, dict[str, Any]] = {}
        deadline = (
            time.monotonic() + self.config.settle_delay_seconds + self.config.settle_timeout_seconds
        )
        while time.monotonic() < deadline:
            if self._exited_by_itself():
                self.killing = True
                await self.start()
            for call in self.calls:
                if call.call_sid in views:
                    continue
                try:
                    status, view = await asyncio.to_thread(
                        self.meterd.request, "GET", f"/admin/calls/{call.call_sid}", None
                    )
                except OSError:
                    break
                if status == 200 and isinstance(view, dict) and view.get("settled_at"):
                    views[call.call_sid] = view
            if len(views) == len(self.calls):
                break
            await asyncio.sleep(1.0)
        for call in self.calls:
            if call.call_sid not in views:
                self.problems.append(f"{call.call_sid} never settled")
        return views


_OPTIONS = Options(
    duplicates=False, reorder=False, time_scale=1.0, settle_delay=0, waiver_reason=""
)


# --- the checks --------------------------------------------------------------------------------


@dataclass
class Stored:
    events: dict[str, list[tuple[str, str]]]  # call_sid: [(dedup_key, params_json)]
    transactions: list[dict[str, Any]]  # of our calls: key, kind, call_sid, reverses_key, ...
    used: dict[str, int]  # call_sid: net system:minutes:used
    markers: dict[tuple[str, str], int]  # (call_sid, agent): minutes posted
    ended_at: dict[str, Any]


async def read_database(url: str, call_sids: list[str]) -> Stored:
    database = await open_database(url, upgrade=False)
    try:
        async with database.read() as connection:
            wanted = set(call_sids)
            events: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for chunk in _chunks(call_sids, 200):
                rows = await connection.execute(
                    select(
                        webhook_events.c.call_sid,
                        webhook_events.c.dedup_key,
                        webhook_events.c.params_json,
                    ).where(webhook_events.c.call_sid.in_(chunk))
                )
                for row in rows:
                    events[row.call_sid].append((row.dedup_key, row.params_json))
            transactions = []
            used: dict[str, int] = defaultdict(int)
            for chunk in _chunks(call_sids, 200):
                rows = await connection.execute(
                    select(
                        ledger_transactions.c.transaction_id,
                        ledger_transactions.c.idempotency_key,
                        ledger_transactions.c.kind,
                        ledger_transactions.c.call_sid,
                        ledger_transactions.c.reverses_key,
                        ledger_transactions.c.posted_at,
                    ).where(ledger_transactions.c.call_sid.in_(chunk))
                )
                transactions += [dict(row._mapping) for row in rows]
                rows = await connection.execute(
                    select(ledger_transactions.c.call_sid, ledger_postings.c.amount)
                    .join(
                        ledger_postings,
                        ledger_postings.c.transaction_id == ledger_transactions.c.transaction_id,
                    )
                    .where(
                        ledger_transactions.c.call_sid.in_(chunk),
                        ledger_postings.c.book == "system:minutes:used",
                    )
                )
                for row in rows:
                    used[row.call_sid] += int(row.amount)
            markers = {
                (row.call_sid, row.agent_id): row.minutes_posted
                for row in await connection.execute(select(call_agent_minutes))
                if row.call_sid in wanted
            }
            ended_at = {
                row.call_sid: row.ended_at
                for row in await connection.execute(select(calls.c.call_sid, calls.c.ended_at))
                if row.call_sid in wanted
            }
    finally:
        await database.close()
    return Stored(dict(events), transactions, dict(used), markers, ended_at)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


def check(
    chaos: Chaos,
    views: dict[str, dict[str, Any]],
    stored: Stored,
    balances: dict[str, tuple[int, int]],
) -> tuple[int, int, list[str], dict[str, Any]]:
    """(lost, repeated, problems, stats) of the run."""
    prices = Prices(RATE_MINOR, INCIDENT_MINOR, INCREMENT_SECONDS)
    lost = repeated = 0
    problems: list[str] = []
    stats: Counter[str] = Counter()

    # every event answered 2xx is stored exactly once, as it was sent
    sent: dict[str, dict[str, Delivery]] = defaultdict(dict)
    for delivery in chaos.deliveries:
        if delivery.delivered_at is not None:
            sent[delivery.call_sid][delivery.dedup_key] = delivery
    for call in chaos.calls:
        rows = stored.events.get(call.call_sid, [])
        counts = Counter(key for key, _ in rows)
        for key, delivery in sent[call.call_sid].items():
            if counts[key] == 0:
                lost += 1
                problems.append(f"LOST event {key} ({delivery.what}): answered 2xx, not stored")
        for key, count in counts.items():
            if count > 1:
                repeated += count - 1
                problems.append(f"REPEATED event {key}: stored {count}x")
            if key not in sent[call.call_sid]:
                problems.append(f"event {key} stored, but never answered 2xx")
        for key, params_json in rows:
            delivery = sent[call.call_sid].get(key)
            if delivery is not None and json.loads(params_json) != [
                list(pair) for pair in delivery.params.items()
            ]:
                repeated += 1
                problems.append(f"event {key} stored with other content than was sent")
        stats["events stored"] += len(rows)

    # every minute of the expectation stands once in the ledger, none beyond it
    reversed_keys = {row["reverses_key"] for row in stored.transactions if row["reverses_key"]}
    standing: Counter[tuple[str, str, int]] = Counter()
    for row in stored.transactions:
        key = row["idempotency_key"]
        match = MINUTE_KEY.match(key.removesuffix(":from-bank"))
        if match is None or row["reverses_key"]:
            continue
        minute = (match["sid"], match["agent"], int(match["n"]))
        stats["minute transactions"] += 1
        ended = stored.ended_at.get(row["call_sid"])
        if ended is not None and row["posted_at"] < ended:
            stats["minutes posted live (before their call ended)"] += 1
        if key in reversed_keys:
            stats["minutes given back at settlement"] += 1
        else:
            standing[minute] += 1
    spent: Counter[str] = Counter()
    for call in chaos.calls:
        sid = call.call_sid
        expected = expect(call, prices)
        minutes = {agent: a["agent_minutes"] for agent, a in expected["agents"].items()}
        for agent, count in minutes.items():
            for n in range(1, count + 1):
                stands = standing[(sid, agent, n)]
                if stands == 0:
                    lost += 1
                    problems.append(f"LOST minute {n} of {agent} on {sid}: not in the ledger")
                elif stands > 1:
                    repeated += stands - 1
                    problems.append(f"REPEATED minute {n} of {agent} on {sid}: stands {stands}x")
        for (other, agent, n), stands in standing.items():
            if other == sid and stands and n > minutes.get(agent, 0):
                repeated += stands
                problems.append(
                    f"REPEATED minute {n} of {agent} on {sid}: stands, the call has "
                    f"{minutes.get(agent, 0)}"
                )
        total = sum(minutes.values())
        stats["minutes expected"] += total
        if stored.used.get(sid, 0) != total:
            problems.append(
                f"{sid}: system:minutes:used moved {stored.used.get(sid, 0)}, not {total}"
            )
        for agent, count in minutes.items():
            marker = stored.markers.get((sid, agent), 0)
            if marker != count:
                problems.append(f"{sid}: {agent}'s minutes-posted marker {marker}, not {count}")
        view = views.get(sid)
        if view is not None:
            for difference in compare(call, expected, view, RATE_MINOR):
                late = [
                    d.what
                    for d in chaos.deliveries
                    if d.call_sid == sid
                    and d.delivered_at is not None
                    and view["settled_at"]
                    and d.delivered_at > _epoch(view["settled_at"])
                    and d.route == "/twilio/conference"
                ]
                problems.append(
                    f"{sid} ({call.describe()}): {difference}"
                    + (f" [delivered after settlement: {late}]" if late else "")
                )
        spent[call.account.kind] += total
    for kind, account in chaos.accounts.items():
        bank, deposit = balances[kind]
        want = (
            (account.initial_bank - spent[kind], 0)
            if kind == "bank"
            else (0, account.initial_deposit - spent[kind] * RATE_MINOR)
        )
        if (bank, deposit) != want:
            problems.append(f"account {kind}: bank, deposit {(bank, deposit)}, expected {want}")
    return lost, repeated, problems, dict(stats)


def _epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def log_errors(log: str) -> tuple[list[str], Counter[str]]:
    """Lines at error or critical (and any that is not JSON), and counts of some info lines."""
    errors: list[str] = []
    notes: Counter[str] = Counter()
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            errors.append(line)
            continue
        if not isinstance(entry, dict):
            errors.append(line)
            continue
        if entry.get("level") in ("error", "critical"):
            errors.append(line)
        event = str(entry.get("event"))
        if event in ("settlement corrected live minutes", "call settled"):
            notes[event] += 1
        elif entry.get("level") == "warning" and not event.startswith(START_UP_NOTES):
            notes[f"warning: {event}"] += 1
    return errors, notes


async def run_chaos(config: ChaosConfig) -> ChaosResult:
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="meterd-chaos-"))
    meterd = MeterdProcess(
        workdir / "state",
        config.database_url,
        settle_delay_seconds=str(config.settle_delay_seconds),
        rate_per_agent_minute_minor=str(RATE_MINOR),
        incident_price_minor=str(INCIDENT_MINOR),
        increment_seconds=str(INCREMENT_SECONDS),
        included_minutes=str(INCLUDED_MINUTES),
        log_level="info",
    )
    await asyncio.to_thread(meterd.start)
    began = time.monotonic()
    stopped: int | None = None
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            chaos = Chaos(config, meterd, session)
            chaos.set_up_accounts()
            placing = asyncio.create_task(chaos.place_calls())
            try:
                await chaos.kill_loop()
            except RuntimeError:  # meterd did not come back: nothing more can be checked
                for task in [placing, *chaos.tasks]:
                    task.cancel()
                await asyncio.gather(placing, *chaos.tasks, return_exceptions=True)
                return ChaosResult(
                    len(chaos.kills), len(chaos.calls), 0, 0, False, chaos.problems, {}, workdir
                )
            await placing
            views = await chaos.wait_settled()
            balances = {}
            for kind, account in chaos.accounts.items():
                _, view = await asyncio.to_thread(
                    meterd.request, "GET", f"/admin/accounts/{account.account_id}", None
                )
                balances[kind] = (view["bank_minutes"], view["deposit_minor"])
        stopped = await asyncio.to_thread(meterd.stop)
    finally:
        if meterd.process is not None and meterd.process.poll() is None:
            await asyncio.to_thread(meterd.kill9)
    elapsed = time.monotonic() - began

    problems = list(chaos.problems)
    if stopped != 0:
        problems.append(f"meterd stopped with status {stopped}, not 0")
    stored = await read_database(meterd.database_url, [c.call_sid for c in chaos.calls])
    lost, repeated, found, stats = check(chaos, views, stored, balances)
    problems += found
    ledger = await asyncio.to_thread(
        subprocess.run,
        [METERD, "ledger", "check"],
        env=meterd.env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ledger_ok = ledger.returncode == 0 and "ledger OK" in ledger.stdout
    if not ledger_ok:
        problems.append(f"meterd ledger check exited {ledger.returncode}: {ledger.stdout[-2000:]}")
    errors, notes = log_errors(meterd.log())
    problems += [f"meterd logged: {line[:600]}" for line in errors[:20]]

    attempts = sum(d.attempts for d in chaos.deliveries)
    failures: Counter[str] = Counter()
    for delivery in chaos.deliveries:
        failures.update(delivery.failures)
    restarts = chaos.restart_seconds
    stats.update(
        {
            "seconds": round(elapsed),
            "kills": dict(Counter(k.phase for k in chaos.kills)),
            "webhooks": len(chaos.deliveries),
            "webhook attempts": attempts,
            "retried": sum(1 for d in chaos.deliveries if d.attempts > 1),
            "failed attempts": dict(failures.most_common()),
            "restart to healthy s (median, max)": (
                round(statistics.median(restarts), 2) if restarts else None,
                round(max(restarts), 2) if restarts else None,
            ),
            "log: settlement corrected live minutes": notes["settlement corrected live minutes"],
            "error lines logged": len(errors),
            "warnings logged": {
                name.removeprefix("warning: "): count
                for name, count in notes.items()
                if name.startswith("warning: ")
            },
        }
    )
    result = ChaosResult(
        kills=len(chaos.kills),
        calls=len(chaos.calls),
        lost=lost,
        repeated=repeated,
        ledger_check_ok=ledger_ok,
        problems=problems,
        stats=stats,
        workdir=workdir,
    )
    if result.ok and config.workdir is None and not config.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        result.workdir = None
    return result


# --- command line ------------------------------------------------------------------------------


def _range(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, Any]:
        low, _, high = text.partition("-")
        pair = (kind(low), kind(high or low))
        if pair[0] > pair[1] or pair[0] < 0:
            raise argparse.ArgumentTypeError(f"expected LOW-HIGH, got {text!r}")
        return pair

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = ChaosConfig()
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--concurrent-calls", type=int, default=defaults.concurrent_calls)
    parser.add_argument("--max-calls", type=int, default=None)
    parser.add_argument("--call-seconds", type=_range(int), default=defaults.call_seconds)
    parser.add_argument("--head-start", type=_range(int), default=defaults.head_start)
    parser.add_argument("--up-seconds", type=_range(float), default=defaults.up_seconds)
    parser.add_argument("--database-url", default=None, help="postgresql+asyncpg://...")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    parser.add_argument("--no-append", action="store_true", help="print, do not append")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    config = ChaosConfig(
        kills=args.kills,
        concurrent_calls=args.concurrent_calls,
        max_calls=args.max_calls,
        call_seconds=args.call_seconds,
        head_start=args.head_start,
        up_seconds=args.up_seconds,
        database_url=args.database_url,
        seed=seed,
        keep=args.keep,
    )
    result = asyncio.run(run_chaos(config))
    for problem in result.problems[:60]:
        print(problem, file=sys.stderr)
    if len(result.problems) > 60:
        print(f"... and {len(result.problems) - 60} more", file=sys.stderr)
    if result.workdir is not None:
        print(f"state directory and log kept in {result.workdir}", file=sys.stderr)
    backend = "PostgreSQL" if args.database_url else "SQLite"
    lines = [
        result.summary() + ("" if result.ok else f"; {len(result.problems)} problems: FAILED"),
        "",
        f"- backend {backend}; seed {seed}; calls {args.call_seconds[0]}-{args.call_seconds[1]} s "
        f"(head start {args.head_start[0]}-{args.head_start[1]} s), {args.concurrent_calls} at "
        f"a time; daemon up {args.up_seconds[0]}-{args.up_seconds[1]} s between kills",
        *(f"- {name}: {value}" for name, value in result.stats.items()),
    ]
    report(
        args,
        f"Chaos: kill -9 of the daemon {result.kills} times under live metering and retried "
        "webhooks",
        lines,
    )
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
