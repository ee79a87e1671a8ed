"""The model-based money test (issue 11): hypothesis drives the real services and the reference
model in tests/money_model.py with the same scenario, and after settlement and payment
resolution the ledger, localstripe's PaymentIntents and the model must agree, to the minute and
the cent, on SQLite and PostgreSQL.

Each example gets a fresh database (SQLite: a copy of a migrated template on tmpfs; PostgreSQL:
one database per test, emptied between examples), a fresh localstripe and a fresh app with a
ManualClock. Webhooks go through the signed HTTP routes (post_twilio), research and waivers
through /agents, deposits and rates through /admin; the clock is moved from one moment to the
next, and at each tick moment `metering.tick()` and `payments.run()` run as the daemon's jobs
do. The daemon ticks every second; here only the ticks that can matter run: 2 s after each
minute's moment on meterd's clock (the rules' limit; also 2 s after a retroactive research
interval is posted), 1 s after it on Twilio's clock when that is later, 1 s after each call's
settlement moment, and at the scenario's own moments (anywhere, or in the very second an agent
joins, a hold ends, research starts or the call ends: issue 11, defect 1).

Checks, each its own assertion so hypothesis shrinks each kind of failure on its own (the first
failing one of an example is reported; set METERD_MODEL_SKIP=liveness,owed_while_funded,... to
skip kinds): requests, gate, settled, minutes, ledger_check, prices, waived_calls, account,
splits, card, owed_while_funded, liveness. See tests/money_model.py for which are exact and
which are bounds.

    METERD_MODEL_EXAMPLES=2000 .venv/bin/pytest tests/integration/test_money_model.py -x -q
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import text

from meterd.adapters.stripe_gateway import StripeGateway, StripeSettings
from meterd.services.ledger_check import check_ledger
from meterd.store import ledger_store, payments_store
from meterd.store.database import Database, open_database
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.money_model import (
    FAILING_CARD,
    GOOD_CARD,
    SETTLE_DELAY,
    Agent,
    Call,
    Prediction,
    Research,
    Scenario,
    normalise,
    predict,
)
from tests.stripe_server import SECRET_KEY, LocalStripe

from .test_metering import balances, call_view
from .test_payments import intents, pay_params
from .twilio_app import ManualClock, admin, agents, build_app, post_twilio

EXAMPLES = int(os.environ.get("METERD_MODEL_EXAMPLES", "15"))
SKIP = set(filter(None, os.environ.get("METERD_MODEL_SKIP", "").split(",")))
LEDGER_SHOWN = bool(os.environ.get("METERD_MODEL_LEDGER"))
START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
ACCOUNT = "acme"
AGENT_IDS = ("a0", "a1", "a2")
MINUTE_KEY = re.compile(
    r"^call:(?P<sid>[^:]+):agent:(?P<agent>.+):minute:(?P<n>\d+)(:from-bank|:from-deposit|:from-card|:repriced|:owed|:on-debt)?$"
)
MONEY_MINUTES = {"minute_deposit", "minute_debt", "minute_receivable", "minute_card"}


# --- scenarios ----------------------------------------------------------------------------------


@st.composite
def call_plans(draw: st.DrawFn, start: int, skew: int) -> Call:
    end = draw(st.integers(20, 600))
    plan_agents = []
    for agent_id in AGENT_IDS[: draw(st.integers(1, 3))]:
        join = draw(st.integers(0, end - 1))
        leave = draw(st.none() | st.integers(join + 1, end))
        until = end if leave is None else leave
        hold = None
        if until - join > 2 and draw(st.booleans()):
            held = draw(st.integers(join + 1, until - 1))
            hold = (held, draw(st.integers(held, until)))
        plan_agents.append(Agent(agent_id, join, leave, hold))
    customer_hold = None
    if draw(st.booleans()):
        held = draw(st.integers(0, end - 1))
        customer_hold = (held, draw(st.integers(held, end)))
    research: list[Research] = []
    live_agents: set[str] = set()
    starts: set[tuple[str, int]] = set()
    for _ in range(draw(st.integers(0, 2))):
        agent_id = draw(st.sampled_from([a.agent_id for a in plan_agents]))
        kind = draw(st.sampled_from(["live", "after_hang_up", "interval"]))
        if kind == "interval":  # one retroactive interval, posted when it ends
            begin = draw(st.integers(0, end + 20))
            stop = draw(st.integers(begin + 1, min(begin + 300, end + 80)))
            live = False
        else:
            if agent_id in live_agents:
                continue
            low, high = (0, end - 1) if kind == "live" else (end, end + 60)
            begin = draw(st.integers(low, high))
            stop = begin + draw(st.integers(1, 300))
            live = True
            live_agents.add(agent_id)
        if (agent_id, begin) in starts:
            continue
        starts.add((agent_id, begin))
        research.append(Research(agent_id, begin, stop, live))
    call = Call(start, end, tuple(plan_agents), customer_hold, tuple(research))
    waiver = draw(st.sampled_from(["none", "none", "during", "after_hang_up", "after_settlement"]))
    waiver_at = None
    if waiver == "during":
        waiver_at = draw(st.integers(0, end - 1))
    elif waiver == "after_hang_up":
        waiver_at = draw(st.integers(end, end + 60))
    elif waiver == "after_settlement":
        waiver_at = call.settles_at(skew) - start + 2 + draw(st.integers(0, 300))
    pay_token = draw(st.sampled_from([None, GOOD_CARD, FAILING_CARD]))
    return dataclasses.replace(call, waiver_at=waiver_at, pay_token=pay_token)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    skew = draw(st.sampled_from([0, 2, -2, 30, -30]) | st.integers(-30, 30))
    first = draw(call_plans(10, skew))
    calls = [first]
    if draw(st.booleans()):
        calls.append(draw(call_plans(draw(st.integers(10, 1200)), skew)))
    scenario = Scenario(
        skew=skew,
        bank=draw(st.sampled_from([0, 1, 2, 10, 45])),
        deposit=draw(st.sampled_from([0, 80, 150, 500, 2000])),
        card=draw(st.sampled_from([None, GOOD_CARD, FAILING_CARD])),
        on_exhausted=draw(st.sampled_from(["announce", "allow_debt"])),
        rates=tuple(
            draw(
                st.lists(
                    st.tuples(st.integers(1, 1500), st.sampled_from([50, 100, 150, 250])),
                    max_size=2,
                    unique_by=lambda r: r[0],
                )
            )
        ),
        deposits=tuple(
            draw(
                st.lists(
                    st.tuples(st.integers(1, 1500), st.sampled_from([100, 250, 1000])),
                    max_size=2,
                )
            )
        ),
        calls=tuple(calls),
        card_mode=draw(st.sampled_from(["block", "block", "authorize"])),
    )
    scenario = normalise(scenario)
    # extra ticks: anywhere, or in the very second something starts (issue 11, defect 1)
    edges = sorted(
        {
            call.start + offset
            for call in scenario.calls
            for offset in [
                *(a.join for a in call.agents),
                *(a.hold[1] for a in call.agents if a.hold),
                *([call.customer_hold[1]] if call.customer_hold else []),
                *(r.start for r in call.research),
                call.end,
            ]
        }
    )
    ticks = draw(st.lists(st.integers(0, 2000) | st.sampled_from(edges), max_size=8))
    return dataclasses.replace(scenario, ticks=tuple(sorted(set(ticks))))


# --- a fresh database per example ---------------------------------------------------------------


class Databases:
    """SQLite: every example gets a copy of one migrated file, on tmpfs when there is one.
    PostgreSQL: one migrated database for the test, emptied between examples (the ledger's
    append-only triggers are bypassed for that with session_replication_role = replica), with
    synchronous_commit off (durability is not under test here)."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.count = 0
        self.template: Path | None = None
        self.tables: list[str] = []

    async def prepare(self) -> None:
        database = await open_database(self.url)
        try:
            if database.dialect == "sqlite":
                self.template = Path(self.url.split("///", 1)[1])
            else:
                async with database.read() as connection:
                    names = (
                        await connection.scalars(
                            text(
                                "SELECT tablename FROM pg_tables WHERE schemaname = "
                                "current_schema() AND tablename <> 'alembic_version'"
                            )
                        )
                    ).all()
                    for name in names:
                        rows = await connection.scalar(text(f'SELECT count(*) FROM "{name}"'))
                        assert rows == 0, f"migrations left rows in {name}: cannot empty it"
                self.tables = list(names)
        finally:
            await database.close()

    async def fresh(self) -> Database:
        self.count += 1
        if self.template is not None:
            path = self.workdir / f"example-{self.count}.sqlite3"
            shutil.copyfile(self.template, path)
            return await open_database(f"sqlite+aiosqlite:///{path}", upgrade=False)
        # commits need not reach the disk in a test (much faster on a busy machine)
        database = await open_database(
            self.url,
            upgrade=False,
            connect_args={"server_settings": {"synchronous_commit": "off"}},
        )
        async with database.write() as connection:
            await connection.execute(text("SET LOCAL session_replication_role = replica"))
            for table in self.tables:  # DELETE: quicker than TRUNCATE on a few rows
                await connection.execute(text(f'DELETE FROM "{table}"'))
        return database

    async def done(self, database: Database) -> None:
        await database.close()
        if self.template is not None:
            for suffix in ("", "-wal", "-shm"):
                path = self.workdir / f"example-{self.count}.sqlite3{suffix}"
                path.unlink(missing_ok=True)


# --- the driver ---------------------------------------------------------------------------------


def at(seconds: int) -> dt.datetime:
    return START + dt.timedelta(seconds=seconds)


class Run:
    """One example against the real services."""

    def __init__(self, scenario: Scenario, client: TestClient, clock: ManualClock) -> None:
        self.scenario = scenario
        self.client = client
        self.clock = clock
        self.services = client.app[SERVICES]
        self.scripts = [
            CallScript(i + 1, at(c.start + scenario.skew)) for i, c in enumerate(scenario.calls)
        ]
        self.sids = [s.call_sid for s in self.scripts]
        self.connected: dict[int, bool] = {}
        self.gate: dict[int, str] = {}
        self.problems: dict[str, list[str]] = defaultdict(list)
        # the ledger as replayed from /admin/ledger, in commit order
        self.after_id = 0
        self.transactions: list[dict[str, Any]] = []
        self.live_minutes: dict[str, dict[str, Any]] = {}  # key -> transaction, not reversed
        self.repriced_unpaid: dict[str, str] = {}  # repriced owed or debt minutes, not judged yet
        self.balance: dict[str, int] = defaultdict(int)
        self.prediction: Prediction | None = None
        self.notes: list[str] = []

    def problem(self, kind: str, text_: str) -> None:
        if len(self.problems[kind]) < 20:
            self.problems[kind].append(text_)

    async def setup(self) -> None:
        s = self.scenario
        body = {
            "account_id": ACCOUNT,
            "name": "Acme",
            "plan": "per_minute",
            "caller_ids": [CUSTOMER_NUMBER],
            "products": [{"product": "desktop", "kind": "license"}] if s.bank == 45 else [],
        }
        await self.expect(admin(self.client, "POST", "/admin/accounts", body), 201)
        if s.bank not in (0, 45):
            grant = {"minutes": s.bank, "reference": "bank0"}
            await self.expect(
                admin(self.client, "POST", f"/admin/accounts/{ACCOUNT}/minutes", grant), 201
            )
        if s.deposit:
            await self.deposit(s.deposit, "deposit0")
        for effective, amount in s.rates:
            rate = {
                "kind": "per_agent_minute",
                "currency": "USD",
                "amount_minor": amount,
                "effective_from": at(effective).isoformat(),
            }
            await self.expect(admin(self.client, "POST", "/admin/rates", rate), 201)
        if s.card is not None:
            outcome = await self.services.payments.save_card(ACCOUNT, s.card)
            assert outcome.ok, outcome

    async def expect(self, request: Awaitable[Any], *statuses: int) -> Any:
        response = await request
        if response.status not in statuses:
            self.problem(
                "requests",
                f"at {self.now}: {response.method} {response.url.path} answered "
                f"{response.status}: {(await response.text())[:300]}",
            )
        return response

    @property
    def now(self) -> int:
        return int((self.clock.now - START).total_seconds())

    async def deposit(self, amount: int, reference: str) -> None:
        body = {"amount_minor": amount, "reference": reference}
        await self.expect(
            admin(self.client, "POST", f"/admin/accounts/{ACCOUNT}/deposits", body), 201
        )

    # --- the actions ----------------------------------------------------------------------------

    def actions(self) -> list[tuple[int, int, Callable[[], Awaitable[None]]]]:
        """(moment, order within the second, action); ticks are added by `tick_moments`."""
        s = self.scenario
        out: list[tuple[int, int, Callable[[], Awaitable[None]]]] = []
        for i, (moment, amount) in enumerate(s.deposits):
            out.append((moment, 0, self._deposit_action(amount, f"deposit{i + 1}")))
        for index, call in enumerate(s.calls):
            out.append((call.start, 1, self._ring_action(index)))
            for moment, params in self._webhooks(index):
                out.append((moment, 2, self._webhook_action(index, params)))
            for mark in call.research:
                if mark.live:
                    out.append(
                        (call.start + mark.start, 3, self._research_action(index, mark, "start"))
                    )
                    out.append(
                        (call.start + mark.stop, 3, self._research_action(index, mark, "stop"))
                    )
                else:
                    out.append((call.start + mark.stop, 3, self._research_action(index, mark, "")))
            if call.waiver_at is not None:
                out.append((call.start + call.waiver_at, 4, self._waiver_action(index)))
        return out

    def _webhooks(self, index: int) -> list[tuple[int, dict[str, str]]]:
        """The call's conference and call-status callbacks, each with the moment (meterd's
        clock) it is delivered: the moment it happened, stamped `skew` later by Twilio."""
        call, script = self.scenario.calls[index], self.scripts[index]
        steps: list[tuple[int, str, str]] = [(0, "join", "customer")]
        for agent in call.agents:
            who = f"agent:{agent.agent_id}"
            steps.append((agent.join, "join", who))
            if agent.hold is not None:
                steps += [(agent.hold[0], "hold", who), (agent.hold[1], "unhold", who)]
            if agent.leave is not None:
                steps.append((agent.leave, "leave", who))
        if call.customer_hold is not None:
            steps += [
                (call.customer_hold[0], "hold", "customer"),
                (call.customer_hold[1], "unhold", "customer"),
            ]
        offsets: list[int] = []
        for offset, action, who in sorted(steps, key=lambda step: step[0]):
            getattr(script, action)(who, offset)
            offsets += [offset] * (len(script.events) - len(offsets))
        script.end(call.end)
        offsets += [call.end] * (len(script.events) - len(offsets))
        out = [(call.start + o, p) for o, p in zip(offsets, script.events, strict=True)]
        out += [(call.start + call.end, p) for p in script.status_events]
        return out

    def _deposit_action(self, amount: int, reference: str) -> Callable[[], Awaitable[None]]:
        return lambda: self.deposit(amount, reference)

    def _ring_action(self, index: int) -> Callable[[], Awaitable[None]]:
        async def ring() -> None:
            script, call = self.scripts[index], self.scenario.calls[index]
            response = await self.expect(
                post_twilio(self.client, "/twilio/voice", script.voice()), 200
            )
            twiml = await response.text()
            decision = "rejected"
            if "<Pay" in twiml:
                if call.pay_token is not None:
                    response = await self.expect(
                        post_twilio(
                            self.client,
                            "/twilio/pay?attempt=1",
                            pay_params(script.call_sid, token=call.pay_token),
                        ),
                        200,
                    )
                    twiml = await response.text()
                if "<Pay" in twiml:  # the caller hangs up rather than try another card
                    attempt = 2 if call.pay_token is not None else 1
                    await self.expect(
                        post_twilio(
                            self.client,
                            f"/twilio/pay?attempt={attempt}",
                            pay_params(script.call_sid, result="caller-hung-up"),
                        ),
                        200,
                    )
            self.connected[index] = "<Conference" in twiml
            if self.connected[index]:  # a block bought at the gate is in the ledger by now
                await self.replay()
                if self.scenario.authorize:  # an authorisation placed at the gate
                    async with self.services.database.read() as connection:
                        hold = await payments_store.last_purchase(connection, script.call_sid)
                    bought = hold is not None
                else:
                    bought = any(
                        t["kind"] == "card_block" and t["call_sid"] == script.call_sid
                        for t in self.transactions
                    )
                decision = "block" if bought else "funded"
            self.gate[index] = decision

        return ring

    def _webhook_action(self, index: int, params: dict[str, str]) -> Callable[[], Awaitable[None]]:
        async def deliver() -> None:
            if not self.connected.get(index):
                return  # Twilio never made the conference
            path = "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status"
            await self.expect(post_twilio(self.client, path, params), 204)

        return deliver

    def _research_action(
        self, index: int, mark: Research, action: str
    ) -> Callable[[], Awaitable[None]]:
        async def flag() -> None:
            if not self.connected.get(index):
                return
            call = self.scenario.calls[index]
            body: dict[str, str] = {"call_sid": self.sids[index], "agent_id": mark.agent_id}
            if action:
                body["action"] = action
            else:
                body["start"] = at(call.start + mark.start).isoformat()
                body["end"] = at(call.start + mark.stop).isoformat()
            await self.expect(agents(self.client, "/agents/research", body), 200)

        return flag

    def _waiver_action(self, index: int) -> Callable[[], Awaitable[None]]:
        async def waive() -> None:
            if not self.connected.get(index):
                return
            body = {"call_sid": self.sids[index], "agent_id": "a0", "reason": "software_defect"}
            await self.expect(agents(self.client, "/agents/waiver", body), 200)

        return waive

    def tick_moments(self, prediction: Prediction) -> set[int]:
        """Where the daemon's every-second tick can matter: 2 s after each minute's moment on
        meterd's clock (the rules' limit), 1 s after it on Twilio's when that is later, 2 s
        after a retroactive research interval is posted, each call's settlement moment, and
        the scenario's own moments."""
        s = self.scenario
        moments = set(s.ticks)
        for m in prediction.minutes:
            start = s.calls[m.call].start
            moments.add(max(m.funded_true, start) + 2)
            if m.funded + 1 > m.funded_true + 2:
                moments.add(max(m.funded, start) + 1)
        for call in s.calls:
            moments.add(call.settles_at(s.skew) + 1)
            moments |= {call.start + r.stop + 2 for r in call.research if not r.live}
        return moments

    async def tick(self) -> None:
        await self.metering_tick()
        await self.services.payments.run()
        await self.replay()
        self.check_live()

    async def metering_tick(self) -> None:
        """As the daemon's metering job: callbacks in the webhook journal first (one the database
        did not take within webhook_journal_wait_ms, the machine being busy, was answered from
        it), and no metering while it still holds some."""
        await self.services.intake.replay()
        if not self.services.intake.journaling:
            await self.services.metering.tick()

    # --- the ledger, replayed -------------------------------------------------------------------

    async def replay(self, *, via_api: bool = False) -> None:
        """Read the account's new ledger transactions: through the admin API (as finance
        would), or, after each tick, through the same store function (faster)."""
        while True:
            if via_api:
                response = await admin(
                    self.client,
                    "GET",
                    f"/admin/ledger?account_id={ACCOUNT}&after_id={self.after_id}&limit=500",
                )
                transactions = (await response.json())["transactions"]
            else:
                async with self.services.database.read() as connection:
                    transactions = await ledger_store.list_transactions(
                        connection,
                        account_id=ACCOUNT,
                        call_sid=None,
                        since=None,
                        after_id=self.after_id,
                        limit=500,
                    )
            for transaction in transactions:
                self._replay_one(transaction)
                self.after_id = transaction["transaction_id"]
            if len(transactions) < 500:
                break
        for message in self.repriced_unpaid.values():  # not paid by a later step either
            self.problem("owed_while_funded", message)
        self.repriced_unpaid.clear()

    def _replay_one(self, transaction: dict[str, Any]) -> None:
        self.transactions.append(transaction)
        kind, key = transaction["kind"], transaction["key"]
        bank = self.balance[f"customer:{ACCOUNT}:bank"]
        deposit = self.balance[f"customer:{ACCOUNT}:deposit"]
        if kind in ("minute_receivable", "minute_debt"):
            amount = _revenue(transaction)
            if bank >= 1 or deposit >= amount:
                message = (
                    f"{key} was posted as {kind} at {self.now} while the bank held {bank} "
                    f"and the deposit {deposit}"
                )
                if key.endswith(":repriced"):
                    # settlement prices a minute first and pays it in the funding order after,
                    # in the same transaction: judged by where that leaves it
                    self.repriced_unpaid[key] = message
                else:
                    self.problem("owed_while_funded", message)
        if kind == "reversal":
            self.repriced_unpaid.pop(transaction["reverses_key"] or "", None)
        if kind.startswith("minute_"):
            self.live_minutes[key] = transaction
        if kind == "reversal":
            self.live_minutes.pop(transaction["reverses_key"] or "", None)
        for posting in transaction["postings"]:
            self.balance[posting["book"]] += posting["amount"]

    def posted(self, index: int) -> dict[str, set[int]]:
        """Per agent, the minute numbers of the call posted and not reversed."""
        out: dict[str, set[int]] = defaultdict(set)
        for key in self.live_minutes:
            match = MINUTE_KEY.match(key)
            if match and match["sid"] == self.sids[index]:
                out[match["agent"]].add(int(match["n"]))
        return out

    def check_live(self) -> None:
        prediction = self.prediction
        assert prediction is not None
        for index in range(len(self.scenario.calls)):
            if not self.connected.get(index):
                continue
            posted = self.posted(index)
            for agent in prediction.times[index]:
                required = prediction.required_live(index, agent, self.now)
                if len(posted.get(agent, ())) < required:
                    self.problem(
                        "liveness",
                        f"at {self.now} call {index} agent {agent}: {len(posted.get(agent, ()))} "
                        f"minutes posted, {required} due by {self.now - 2} (meterd's clock)",
                    )

    # --- the whole example ----------------------------------------------------------------------

    async def play(self) -> None:
        prediction = predict(self.scenario)
        self.prediction = prediction
        steps: list[tuple[int, int, Callable[[], Awaitable[None]]]] = self.actions()
        steps += [(moment, 9, self.tick) for moment in self.tick_moments(prediction)]
        self.ticks_run = sum(1 for step in steps if step[1] == 9)
        steps.sort(key=lambda step: step[:2])
        for moment, _, step in steps:
            self.clock.now = max(self.clock.now, at(moment))
            await step()
        # resolve everything: settlement, queued card operations, anything left in flight
        self.clock.now = max(
            self.clock.now, at(max(c.settles_at(self.scenario.skew) for c in self.scenario.calls))
        ) + dt.timedelta(seconds=60)
        await self.tick()
        self.clock.advance(120)
        await self.tick()
        await self.metering_tick()
        await self.services.payments.run()
        await self.replay(via_api=True)

    async def compare(self, database: Database, localstripe: LocalStripe) -> None:
        s = self.scenario
        gates = {i: self.gate[i] for i in range(len(s.calls))}
        prediction = predict(s, gates)
        self.prediction = prediction
        self.notes.append(
            f"model: gates {prediction.gates} (options {prediction.gate_options}), "
            f"loose={prediction.loose!r}, outcomes {prediction.outcomes}"
        )
        for index in range(len(s.calls)):
            # a call waived while another is open had charges when that other call rang, which
            # the model (leaving a waived call's charges out) does not see: its gate is loose
            if prediction.loose:
                continue
            if gates[index] not in prediction.gate_options[index]:
                self.problem(
                    "gate",
                    f"call {index} rang at {s.calls[index].start}: meterd's gate said "
                    f"{gates[index]}, the model {sorted(prediction.gate_options[index])}",
                )
        views = {}
        for index in range(len(s.calls)):
            if self.connected[index]:
                views[index] = await call_view(self.client, self.scripts[index])
        # settled, minutes per agent
        for index, view in views.items():
            if view["settled_at"] is None:
                self.problem("settled", f"call {index} is not settled: {view['status']}")
            want = prediction.agent_minutes(index)
            got = {a: v["agent_minutes"] for a, v in view["agents"].items() if v["agent_minutes"]}
            if got != {a: n for a, n in want.items() if n}:
                self.problem("minutes", f"call {index}: view says {got}, the model {want}")
            if index in prediction.waived:
                continue
            posted = self.posted(index)
            posted_want = {a: set(range(1, n + 1)) for a, n in want.items() if n}
            if {a: ns for a, ns in posted.items() if ns} != posted_want:
                self.problem(
                    "minutes",
                    f"call {index}: the ledger holds minutes "
                    f"{ {a: sorted(ns) for a, ns in posted.items()} }, the model {want}",
                )
        report = await check_ledger(database)
        if not report.ok:
            self.problem("ledger_check", str(report.breaches))
        # the price of every money-paid minute
        for key, transaction in self.live_minutes.items():
            if transaction["kind"] not in MONEY_MINUTES:
                continue
            match = MINUTE_KEY.match(key)
            assert match is not None, key
            index = self.sids.index(match["sid"])
            prices = prediction.prices(index, match["agent"], int(match["n"]))
            if _revenue(transaction) not in prices:
                self.problem(
                    "prices",
                    f"{key} ({transaction['kind']}) cost {_revenue(transaction)}, the rate in "
                    f"force when it fell due is {sorted(prices)}",
                )
        # a waived call: nothing charged, nothing kept (when it met another call, a block it
        # bought may still pay for that call's minutes: card money is then only bounded)
        for index in sorted(prediction.waived & views.keys()):
            charges = views[index]["charges"]
            wanted = {"bank_minutes": 0, "deposit_minor": 0, "owed_minor": 0, "card_minor": 0}
            got = {k: charges[k] for k in wanted}
            if prediction.loose and 0 <= got["card_minor"] <= prediction.card_kept_most:
                wanted["card_minor"] = got["card_minor"]
            if got != wanted:
                self.problem("waived_calls", f"call {index} was waived but shows {got}")
        # the account, and what the card kept
        bank, deposit = await balances(self.client)
        owed = -self.balance[f"customer:{ACCOUNT}:receivable"]
        card_ledger = -self.balance["system:USD:card_receipts"]
        kept, charged, refunded = 0, 0, 0
        for intent in await intents(localstripe, ""):
            if intent.status != "succeeded":
                continue
            charge = intent.latest_charge
            refund = charge.amount_refunded if charge and not isinstance(charge, str) else 0
            charged += intent.amount
            refunded += refund
            kept += intent.amount - refund
        self.notes.append(
            f"meterd: bank {bank}, deposit {deposit}, owed {owed}, card kept {kept} "
            f"(charged {charged}, refunded {refunded}; ledger {card_ledger})"
        )
        if kept != card_ledger:
            self.problem(
                "card",
                f"the card kept {kept} (charged {charged}, refunded {refunded}) but the ledger "
                f"says {card_ledger}",
            )
        why = prediction.account_problem(bank, deposit, owed, kept)
        if why:
            self.problem("account", why)
        if prediction.splits_exact:
            outcome = prediction.exact_outcome
            assert outcome is not None
            for index, view in views.items():
                split = outcome.splits[index]
                want = (split.bank_minutes, split.deposit_minor, split.owed_minor)
                charges = view["charges"]
                got = (charges["bank_minutes"], charges["deposit_minor"], charges["owed_minor"])
                if s.authorize:  # and the money of its minutes its authorisations paid
                    want, got = (*want, split.card_minor), (*got, charges["card_minor"])
                if got != want:
                    self.problem(
                        "splits",
                        f"call {index} charged (bank minutes, deposit, owed, card) {got}, the "
                        f"model {want}",
                    )

    def verdict(self, report: Callable[[str], None] = note) -> None:
        """Assert each kind of problem; `report` (hypothesis's note, or print outside
        hypothesis) gets the model's and meterd's figures first."""
        problems = {k: v for k, v in self.problems.items() if k not in SKIP}
        for line in self.notes:
            report(line)
        if LEDGER_SHOWN:  # METERD_MODEL_LEDGER=1: the account's ledger, as replayed
            for t in self.transactions:
                moves = {p["book"].rsplit(":", 1)[-1]: p["amount"] for p in t["postings"]}
                report(f"  {t['posted_at'][11:19]} {t['kind']:<18} {t['key']} {moves}")
        for kind, found in problems.items():
            report(f"{kind}: {found}")
        assert not problems.get("requests"), problems["requests"]
        assert not problems.get("gate"), problems["gate"]
        assert not problems.get("settled"), problems["settled"]
        assert not problems.get("minutes"), problems["minutes"]
        assert not problems.get("ledger_check"), problems["ledger_check"]
        assert not problems.get("prices"), problems["prices"]
        assert not problems.get("waived_calls"), problems["waived_calls"]
        assert not problems.get("account"), problems["account"]
        assert not problems.get("splits"), problems["splits"]
        assert not problems.get("card"), problems["card"]
        assert not problems.get("owed_while_funded"), problems["owed_while_funded"]
        assert not problems.get("liveness"), problems["liveness"]


def _revenue(transaction: dict[str, Any]) -> int:
    return sum(
        p["amount"]
        for p in transaction["postings"]
        if p["book"].endswith(":usage_revenue") and p["amount"] > 0
    )


async def run_example(
    scenario: Scenario,
    databases: Databases,
    gateway: StripeGateway,
    localstripe: LocalStripe,
    state_dir: Path,
) -> Run:
    localstripe.reset()
    database = await databases.fresh()
    # a state directory of its own: nothing (a webhook journal) carries over to the next example
    state_dir = Path(tempfile.mkdtemp(dir=state_dir))
    try:
        clock = ManualClock(START)
        app = build_app(
            database,
            state_dir,
            clock,
            gateway=gateway,
            METERD_SETTLE_DELAY_SECONDS=str(SETTLE_DELAY),
            METERD_ON_EXHAUSTED=scenario.on_exhausted,
            METERD_CARD_MODE=scenario.card_mode,
        )
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            run = Run(scenario, client, clock)
            await run.setup()
            await run.play()
            await run.compare(database, localstripe)
            return run
        finally:
            await client.close()
    finally:
        await databases.done(database)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def localstripe():
    server = LocalStripe().start()
    yield server
    server.stop()


@contextlib.contextmanager
def _examples(
    database_url: str, localstripe: LocalStripe, report: Callable[[str], None] = note
) -> Iterator[Callable[[Scenario], None]]:
    """A function that plays one scenario against the real services and asserts the verdict."""
    workdir = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    structlog_config = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    try:
        with asyncio.Runner() as runner:
            databases = Databases(database_url, workdir)
            runner.run(databases.prepare())
            gateway = runner.run(_gateway(localstripe))
            try:

                def play(scenario: Scenario) -> None:
                    run = runner.run(
                        run_example(scenario, databases, gateway, localstripe, workdir)
                    )
                    run.verdict(report)

                yield play
            finally:
                runner.run(gateway.close())
    finally:
        structlog.configure(**structlog_config)
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_ledger_and_the_card_agree_with_the_model(database_url, localstripe):
    with _examples(database_url, localstripe) as play:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(scenario=scenarios())
        def check(scenario: Scenario) -> None:
            play(scenario)

        check()


# Examples hypothesis found that once disagreed with the model, replayed as they were drawn
# (after `normalise`), with what was learnt from each.
def _early_block(first_call_a0_joins: int) -> Scenario:
    """Two calls; the deposit pays 5 minutes at 100, then an early block; the rate drops to 50
    at 797 (the early-block past failures below)."""
    return Scenario(
        skew=0,
        bank=0,
        deposit=500,
        card="pm_card_visa",
        on_exhausted="announce",
        rates=((797, 50),),
        deposits=(),
        calls=(
            Call(
                start=10,
                end=599,
                agents=(
                    Agent("a0", join=first_call_a0_joins),
                    Agent("a1", join=68),
                    Agent("a2", join=0),
                ),
            ),
            Call(
                start=664,
                end=599,
                agents=(Agent("a0", join=0), Agent("a1", join=0), Agent("a2", join=574)),
            ),
        ),
        ticks=(),
    )


PAST_FAILURES = [
    # Two agents accruing, the bank empty and the deposit holding one minute (150 at rate 100):
    # meterd buys the block then (README: when bank and deposit "cannot pay the next minute of
    # every accruing agent"), it lands in the bank, and the bank pays first, so the deposit's
    # minute is never taken: bank 24, deposit 150, one block. The model, buying only when
    # nothing can pay, has bank 25, deposit 50, one block. Both are within the rules: the block
    # was needed anyway, and a block bought ahead pays, bank first, what the deposit would have.
    pytest.param(
        Scenario(
            skew=0,
            bank=10,
            deposit=150,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=367,
                    agents=(
                        Agent("a0", join=121, leave=207),
                        Agent("a1", join=291),
                        Agent("a2", join=356, hold=(361, 361)),
                    ),
                    research=(
                        Research("a0", start=269, stop=552, live=True),
                        Research("a1", start=0, stop=300, live=False),
                    ),
                ),
                Call(start=10, end=20, agents=(Agent("a0", join=0),)),
            ),
            ticks=(),
        ),
        id="block-bought-ahead-pays-a-deposit-minute-bank-first",
    ),
    # One agent accruing, the bank's one minute paid: bank and deposit (0) cannot pay the next
    # minute, so meterd buys the block at once; the deposit of 100 arrives at 14, after the
    # block, and from then on the bank pays first, so it is never used: bank 26, deposit 100,
    # one block. The model, buying only when nothing can pay, pays one minute from the late
    # deposit: bank 27, deposit 0. Both are within the rules: a block bought ahead may pay, bank
    # first, any minute the model pays from the deposit after meterd may have bought it, money
    # deposited later included.
    pytest.param(
        Scenario(
            skew=0,
            bank=1,
            deposit=0,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=((14, 100),),
            calls=(
                Call(
                    start=10,
                    end=174,
                    agents=(Agent("a0", join=0), Agent("a1", join=135), Agent("a2", join=158)),
                    research=(Research("a0", start=0, stop=1, live=True),),
                ),
            ),
            ticks=(),
        ),
        id="block-bought-ahead-pays-a-later-deposit-minute-bank-first",
    ),
    # The bank's minute and the deposit's (100) paid on the first call, the last with an agent
    # still accruing: meterd buys the block then. The calls never need it: the second call's 3
    # minutes come after a deposit of 1000, and the bank pays them first: bank 27, deposit 1000,
    # one block. The model, which buys no block, pays them from that deposit: bank 0, deposit
    # 700. Both are within the rules: one block more, bought when the funds were fewer than the
    # agents accruing, may pay bank first minutes the model paid from money deposited later.
    pytest.param(
        Scenario(
            skew=0,
            bank=1,
            deposit=0,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=((1, 100), (196, 1000)),
            calls=(
                Call(
                    start=10,
                    end=174,
                    agents=(
                        Agent("a0", join=47, leave=48),
                        Agent("a1", join=158),
                        Agent("a2", join=134, leave=141, hold=(135, 136)),
                    ),
                    customer_hold=(98, 141),
                ),
                Call(
                    start=401,
                    end=20,
                    agents=(Agent("a0", join=0), Agent("a1", join=0), Agent("a2", join=1)),
                ),
            ),
            ticks=(),
        ),
        id="block-bought-ahead-never-needed-pays-a-later-deposit-bank-first",
    ),
    # A meterd defect, not the model's (fixed in meterd since): research running on after the
    # hang-up is billable and accruing, and docs/billing.md has the card buy a block once bank
    # and deposit cannot pay the next minute of every accruing agent, before anything is owed.
    # meterd watched funds only while the call was connected (MeteringService._watch_funds
    # returned for an ended call), so the research minutes after the hang-up were owed (bank 0,
    # deposit 0, owed 200, no block) though a usable card was on file; the model wants the block
    # (bank 28, deposit 0, one block), as meterd gave with the same billable time and the caller
    # still on the line (the agents leaving at 20, the call ending at 264).
    pytest.param(
        Scenario(
            skew=0,
            bank=0,
            deposit=500,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=20,
                    agents=(
                        Agent("a0", join=0, hold=(1, 14)),
                        Agent("a1", join=0, hold=(1, 1)),
                        Agent("a2", join=0, hold=(1, 1)),
                    ),
                    research=(
                        Research("a0", start=0, stop=1, live=True),
                        Research("a1", start=0, stop=264, live=True),
                    ),
                ),
            ),
            ticks=(),
        ),
        id="research-after-the-hang-up-is-owed-though-a-card-is-on-file",
    ),
    # A meterd defect, not the model's (meterd is not changed here). Twilio's clock 23 s behind
    # ours: meterd counts a0's open conference time to its own clock, so it takes a0's minute 2
    # live from the deposit (150 -> 50); a1's minute 2 then finds 50 and is owed (100). The
    # final timeline gives a0 one minute, so settlement gives minute 2 back (deposit 150) but
    # leaves a1's minute 2 owed: deposit 150 and owed 100 at once, where bank, deposit, then
    # owed (billing-rules.md) has the deposit pay it (deposit 50, owed 0). Settlement pays owed
    # minutes from the bank once it holds minutes again, never from the deposit. With a later
    # call the deposit so kept also connects a caller the model rejects (deposit 50 < 100), or
    # only the calls' splits differ when a deposit made later covers the difference.
    pytest.param(
        Scenario(
            skew=-23,
            bank=2,
            deposit=150,
            card=None,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=152,
                    agents=(Agent("a0", join=52), Agent("a1", join=18)),
                    customer_hold=(38, 101),
                    research=(Research("a0", start=0, stop=1, live=True),),
                ),
            ),
            ticks=(),
        ),
        id="a-minute-owed-while-a-minute-given-back-held-the-deposit",
    ),
    # A meterd defect (2,000 examples on SQLite). Bank 1, deposit 80, rate 100 until 184 then
    # 50, a good card. The customer is held until 255, so minute 1 is taken live at 265 from the
    # bank; at 267 a retroactive research interval (0..257) makes minutes 2-5 due at once.
    # Minutes 2 and 3 fell due at rate 100: nothing can pay them, they are owed and the block
    # is queued; minute 4 fell due at rate 50 and the deposit (80) paid it; minute 5 was owed.
    # Settlement paid the owed minutes from the block (bank) but kept minute 4 on the deposit:
    # bank 26, deposit 30. In the funding order the block was bought at minute 2 and the bank
    # paid every minute after it: bank 25, deposit 80.
    pytest.param(
        Scenario(
            skew=0,
            bank=1,
            deposit=80,
            card="pm_card_visa",
            on_exhausted="announce",
            rates=((184, 50),),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=331,
                    agents=(Agent("a0", join=0),),
                    customer_hold=(0, 255),
                    research=(Research("a0", start=0, stop=257, live=False),),
                ),
            ),
            ticks=(),
        ),
        id="a-deposit-minute-after-an-owed-minute-is-paid-by-its-block",
    ),
    # The model's, not meterd's (2,000 examples on SQLite). Bank 1, no card: a0 and a1 each
    # take a minute of call 0, a0's from the bank, a1's owed (100). The second caller rings at
    # 14 and pays with a card: a block, 29 minutes left after its own. At call 0's settlement
    # the bank holds minutes again, and settlement pays the owed minute from it
    # (docs/billing.md, Settlement 3): bank 28, owed 0. The model kept it owed (bank 29, owed
    # 100) until it settled calls as meterd documents.
    pytest.param(
        Scenario(
            skew=0,
            bank=1,
            deposit=0,
            card=None,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(start=10, end=20, agents=(Agent("a0", join=0), Agent("a1", join=0))),
                Call(start=14, end=20, agents=(Agent("a0", join=0),), pay_token="pm_card_visa"),
            ),
            ticks=(),
        ),
        id="settlement-pays-an-owed-minute-from-a-block-bought-later",
    ),
    # Found at 2,000 examples on PostgreSQL. Twilio's clock 30 s behind ours; the rate drops
    # from 100 to 50 at 314. meterd counts a2's open conference time to its own clock, 30 s more
    # than Twilio will stamp, so it takes a2's minute 5 live at 312 (owed, at 100). Twilio's
    # leave then gives a2 235 s (4 minutes), but a retroactive research interval (504..512)
    # brings a2 to 243 s: minute 5 is supported again, and falls due at 519, when the rate is
    # 50. Settlement kept the live posting and its price: owed 750 where the rules (the rate in
    # force when the minute fell due) give 700. Settlement now prices a minute taken before its
    # final due moment at that moment (the `:repriced` rebooking).
    pytest.param(
        Scenario(
            skew=-30,
            bank=0,
            deposit=500,
            card=None,
            on_exhausted="announce",
            rates=((314, 50),),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=581,
                    agents=(
                        Agent("a0", join=0, leave=327),
                        Agent("a1", join=0, hold=(14, 526)),
                        Agent("a2", join=92, leave=327),
                    ),
                    research=(Research("a2", start=504, stop=512, live=False),),
                ),
            ),
            ticks=(),
        ),
        id="a-minute-taken-early-on-skewed-time-is-priced-at-its-final-due-moment",
    ),
    # Found at 2,000 examples on PostgreSQL. Twilio's clock 30 s ahead of ours; one banked
    # minute and one deposit minute for two calls. Call 0's a0 minute 2 fell due at 82 (our
    # clock), call 1's a0 minute 1 at 89. meterd counted call 0's open time to the latest stamp
    # Twilio had sent for it (63) or our clock, so it wrote minute 2 at 112, 30 s late, after
    # call 1's minute 1 had taken the deposit: the account was right but each call's split was
    # the other's. Open conference time is now counted to our clock plus the lead the call's
    # callbacks showed (a stamp minus when we received it), so minute 2 is written at 82.
    pytest.param(
        Scenario(
            skew=30,
            bank=1,
            deposit=150,
            card=None,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=281,
                    agents=(
                        Agent("a0", join=12, hold=(23, 23)),
                        Agent("a1", join=230, hold=(231, 231)),
                    ),
                ),
                Call(
                    start=77,
                    end=281,
                    agents=(
                        Agent("a0", join=12, hold=(13, 23)),
                        Agent("a1", join=230, hold=(231, 256)),
                    ),
                ),
            ),
            ticks=(),
        ),
        id="a-later-minute-is-not-written-late-by-twilios-lead",
    ),
    # Deposit 500 (5 minutes at 100), a card on file, the rate drops to 50 at 797 (2,000
    # examples on PostgreSQL). Call 0's third agent-minute at 132 leaves the deposit one minute
    # for two accruing agents, so meterd buys a block early (as docs/billing.md says); the bank
    # then paid first and the deposit kept its last 100 through call 0, and in call 1, when the
    # bank was empty again, that 100 paid a minute at 50: (a) the account ended with 50 more in
    # the deposit; (b) the same minutes paid by the other call (splits swapped). The rules
    # (bank, then deposit, then card) have call 0 pay 500 from the deposit: settlement now moves
    # the banked minutes an early block paid while the deposit held their price onto it.
    pytest.param(
        _early_block(first_call_a0_joins=171),
        id="an-early-block-leaves-deposit-money-a-cheaper-minute-uses-later",
    ),
    pytest.param(
        _early_block(first_call_a0_joins=0),
        id="an-early-block-moves-a-deposit-minute-to-the-next-call",
    ),
    # The first fix rebooked onto the deposit only the minutes of the call that bought the
    # early block (2,000 examples): here call 1's minute at 136 came first after it (bought at
    # 132 by call 0 with 100 left), so the funding order has the deposit pay call 1's minute and
    # the block call 0's; the splits were swapped. The walk now goes over every call's minutes.
    pytest.param(
        Scenario(
            skew=-2,
            bank=0,
            deposit=500,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(start=10, end=131, agents=(Agent("a0", join=70), Agent("a1", join=0))),
                Call(start=134, end=20, agents=(Agent("a0", join=0),)),
            ),
            ticks=(),
        ),
        id="an-early-block-pays-another-calls-minute-first",
    ),
    # A review: two blocks bought early with the same 100 left in the deposit (two agents, the
    # first block used up in pairs), then 1000 deposited: the 100 pays one minute, not two.
    pytest.param(
        Scenario(
            skew=0,
            bank=0,
            deposit=500,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=((1100, 1000),),
            calls=(Call(start=10, end=1200, agents=(Agent("a0", join=0), Agent("a1", join=0))),),
            ticks=(),
        ),
        id="two-early-blocks-share-one-deposit-minute",
    ),
    # Authorise mode (2,000 examples): deposit 150, card on file, two agents from the start.
    # Minute 1 of both falls due at once: the deposit pays one, nothing pays the other (no
    # authorisation yet: the gate found the deposit), so it was owed, and the authorisation
    # bought then never paid it: owed 100, card 0. The funding order puts the card before
    # owing: settlement now pays an owed minute from the call's authorisations.
    pytest.param(
        Scenario(
            skew=0,
            bank=0,
            deposit=150,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(Call(start=10, end=20, agents=(Agent("a0", join=0), Agent("a1", join=0))),),
            ticks=(),
            card_mode="authorize",
        ),
        id="authorise-an-owed-minute-is-paid-by-the-authorisation-it-bought",
    ),
    # Authorise mode with allow_debt (2,000 examples): call 1 is connected on a deposit of 100 at
    # rate 50; the rate rises to 250 at 510; its next minute (at 529) finds 50 in the deposit and
    # no authorisation yet, so it went on debt (deposit -200), and the authorisation bought then
    # paid only the minutes after it. The funding order puts the card before debt: settlement
    # pays a minute on debt from the call's authorisations too (deposit 50, card 1800).
    pytest.param(
        Scenario(
            skew=0,
            bank=0,
            deposit=0,
            card=GOOD_CARD,
            on_exhausted="allow_debt",
            rates=((1, 50), (510, 250)),
            deposits=((258, 100),),
            calls=(
                Call(start=10, end=20, agents=(Agent("a0", join=0),)),
                Call(
                    start=469,
                    end=471,
                    agents=(Agent("a0", join=0, hold=(1, 1)),),
                    research=(Research("a0", start=0, stop=1, live=False),),
                ),
            ),
            ticks=(),
            card_mode="authorize",
        ),
        id="authorise-a-minute-on-debt-is-paid-by-the-authorisation-it-bought",
    ),
    # 2,000 examples (also at ffadfb9): Twilio 30 s behind, rate 250 from 74. Call 0's minute 3
    # was taken live on open conference time (250 from the deposit, leaving 50), so a block was
    # bought; call 1's first minute then came from the block. Call 0's leave event took minute 3
    # back at its settlement (deposit 300 again): in the funding order the deposit paid call 1's
    # minute and the block came only at its next one (bank 29, deposit 50, not 28 and 300).
    # The early-block step now judges a block by the deposit as finally booked (minutes given
    # back left out), so this block counts as bought ahead of need.
    pytest.param(
        Scenario(
            skew=-30,
            bank=0,
            deposit=500,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=((74, 250),),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=240,
                    agents=(Agent("a0", join=0, leave=215),),
                    customer_hold=(114, 226),
                ),
                Call(
                    start=14,
                    end=425,
                    agents=(Agent("a0", join=0, hold=(1, 337)), Agent("a1", join=0, hold=(1, 105))),
                    customer_hold=(0, 385),
                    research=(
                        Research("a0", start=400, stop=401, live=True),
                        Research("a1", start=216, stop=217, live=True),
                    ),
                ),
            ),
            ticks=(0, 111),
        ),
        id="a-block-bought-for-a-minute-given-back-pays-bank-first",
    ),
    # 2,000 examples, after the debt fix above: authorise mode, allow_debt, bank 10, a deposit
    # of 100 arriving at 604 during call 1. Live, a minute of call 1 went on debt before the
    # authorisation came, and the deposit of 100 paid that debt off; settlement moved the debt
    # minute to the card (card before debt), which gave the 100 back to the deposit, where the
    # funding order would have spent it on call 1's first minute after 604 instead of the
    # card: deposit 100 / card 2000, the model 0 / 1900. Settlement now pays from the deposit
    # the call's card minutes the freed money would have paid.
    pytest.param(
        Scenario(
            skew=0,
            bank=10,
            deposit=0,
            card=GOOD_CARD,
            on_exhausted="allow_debt",
            rates=(),
            deposits=((604, 100),),
            calls=tuple(
                Call(
                    start=start,
                    end=498,
                    agents=(
                        Agent("a0", join=403, hold=(450, 455)),
                        Agent("a1", join=221),
                        Agent("a2", join=54),
                    ),
                )
                for start in (10, 378)
            ),
            ticks=(),
            card_mode="authorize",
        ),
        id="authorise-money-a-debt-minute-gives-back-pays-a-later-card-minute",
    ),
    # 2,000 examples on SQLite: authorise mode, bank 1, no card. Call 0's minute 2 (at 72) is
    # owed; call 1's caller gives a card at the gate at 74. meterd did not look at call 0 again
    # until its next scheduled look (132, after the call had ended at 131), so it never bought
    # an authorisation and minute 3 was owed too (owed 200, card 100). Fixed: a card saved on
    # file wakes the account's open calls, so the next tick buys call 0's authorisation; at
    # settlement the hold also pays minute 2, owed before the card existed (the model's
    # `_settle_from_the_hold`, docs/billing.md): owed 0, card 300.
    pytest.param(
        Scenario(
            skew=0,
            bank=1,
            deposit=0,
            card=None,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(start=10, end=121, agents=(Agent("a0", join=0),)),
                Call(start=74, end=20, agents=(Agent("a0", join=0),), pay_token=GOOD_CARD),
            ),
            ticks=(),
            card_mode="authorize",
        ),
        id="authorise-a-card-another-caller-gives-pays-an-exhausted-calls-next-minute",
    ),
    # 2,000 examples, both backends (this session): authorise mode, the card on file declines
    # (call 0's authorisation fails), the deposit's 500 runs out, and call 1's caller gives a
    # good card at the gate at 256. meterd never bought call 0 an authorisation again ("its
    # last card payment failed"), so call 0's minutes after 256 went on debt (allow_debt:
    # deposit -2600) or were owed (announce: owed 2600); the model pays them from the new card.
    # Fixed: a decline is resolved once a block or authorisation of the account succeeds after
    # it, and a card payment that succeeds wakes the account's open calls.
    *(
        pytest.param(
            Scenario(
                skew=0,
                bank=0,
                deposit=500,
                card="pm_card_chargeCustomerFail",
                on_exhausted=on_exhausted,
                rates=((186, 250), (378, 150)),
                deposits=(),
                calls=(
                    Call(
                        start=10,
                        end=496,
                        agents=(
                            Agent("a0", join=120),
                            Agent("a1", join=112),
                            Agent("a2", join=166, hold=(243, 349)),
                        ),
                        customer_hold=(354, 426),
                        research=(
                            Research("a0", start=0, stop=219, live=True),
                            Research("a0", start=200, stop=457, live=False),
                        ),
                    ),
                    Call(
                        start=256,
                        end=344,
                        agents=(Agent("a0", join=102),),
                        research=(Research("a0", start=181, stop=stop, live=live),),
                        pay_token=GOOD_CARD,
                    ),
                ),
                ticks=(122, 433, 600, 998),
                card_mode="authorize",
            ),
            id=f"authorise-a-new-card-resolves-a-decline-{on_exhausted}",
        )
        for on_exhausted, stop, live in (("allow_debt", 324, False), ("announce", 182, True))
    ),
    # 2,000 examples on PostgreSQL (this session): Twilio's clock 24 s behind, allow_debt, rates
    # 50 from 201 and 250 from 1456, deposits at 244 and 764. Settlement re-priced call 1's
    # minute 2 (taken on debt, finally due after the rate fell to 50) and booked it on debt
    # again while the deposit, with the old price given back, held the 50: a minute on debt
    # while the deposit held its price. Fixed: `rating.repriced_source` pays such a minute
    # from the deposit.
    pytest.param(
        Scenario(
            skew=-24,
            bank=2,
            deposit=150,
            card=None,
            on_exhausted="allow_debt",
            rates=((201, 50), (1456, 250)),
            deposits=((244, 100), (764, 100)),
            calls=(
                Call(
                    start=10,
                    end=70,
                    agents=(Agent("a0", join=41, hold=(49, 65)), Agent("a1", join=16)),
                    research=(Research("a0", start=26, stop=155, live=True),),
                    waiver_at=364,
                    pay_token=GOOD_CARD,
                ),
                Call(
                    start=40,
                    end=138,
                    agents=(Agent("a0", join=17, hold=(50, 119)),),
                    customer_hold=(118, 134),
                    research=(Research("a0", start=142, stop=414, live=True),),
                ),
            ),
            ticks=(16, 41, 51, 53, 159, 265, 1017, 1999),
        ),
        id="a-repriced-debt-minute-the-deposit-can-pay-is-paid-from-it",
    ),
    # 2,000 examples, both backends (this session, at 2b92a09): authorise mode, a good card on
    # file, deposit 500, three agents, six minutes at 100: meterd paid 2 from the card and
    # left 100 in the deposit (the model: 5 from the deposit, 1 from the card).
    pytest.param(
        Scenario(
            skew=-2,
            bank=0,
            deposit=500,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=((268, 50), (462, 50)),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=226,
                    agents=(
                        Agent("a0", join=183, hold=(221, 223)),
                        Agent("a1", join=113, leave=183, hold=(171, 182)),
                        Agent("a2", join=0),
                    ),
                ),
            ),
            ticks=(0, 8, 123, 255, 448),
            card_mode="authorize",
        ),
        id="authorise-the-deposit-pays-before-the-hold",
    ),
    # 2,000 examples on PostgreSQL (this session, at d9f6935): block mode, bank 2, a good card
    # on file; a 31 s call, then one retroactive research interval of 121 s posted after the
    # hang-up: three minutes at once, the third with nothing in the bank. meterd wrote it owed
    # (100) and bought no block: only an accruing agent made it buy one for an ended call. The
    # model buys a block (card first, then owed): bank 29, card 3000. Fixed: a minute nothing
    # could pay makes the tick ask the funding authority for a block (or authorisation) for
    # an ended call too; settlement then pays that minute from the bank.
    pytest.param(
        Scenario(
            skew=0,
            bank=2,
            deposit=0,
            card=GOOD_CARD,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=41,
                    agents=(Agent("a0", join=0),),
                    customer_hold=(0, 0),
                    research=(Research("a0", start=0, stop=121, live=False),),
                ),
            ),
            ticks=(),
        ),
        id="a-minute-owed-after-the-hang-up-buys-a-block",
    ),
    # 2,000 examples on PostgreSQL (this session, at fff9909), Twilio's clock 30 s behind: the
    # account agreed with the model to the cent; the ledger replay flagged a minute settlement
    # re-priced as owed while the deposit held 500, which settlement's next step (owed paid
    # from the deposit) then rebooked, in the same transaction. The replay now judges a
    # repriced minute by where settlement leaves it (a test change, not a meterd one).
    pytest.param(
        Scenario(
            skew=-30,
            bank=2,
            deposit=0,
            card=None,
            on_exhausted="announce",
            rates=((204, 150), (1380, 250)),
            deposits=((148, 1000), (300, 100)),
            calls=(
                Call(
                    start=10,
                    end=393,
                    agents=(
                        Agent("a0", join=13),
                        Agent("a1", join=134),
                        Agent("a2", join=102, hold=(146, 327)),
                    ),
                    customer_hold=(178, 270),
                    pay_token=GOOD_CARD,
                ),
                Call(
                    start=509,
                    end=400,
                    agents=(
                        Agent("a0", join=231, hold=(282, 391)),
                        Agent("a1", join=47, leave=318),
                    ),
                    research=(Research("a1", start=119, stop=283, live=True),),
                    pay_token=GOOD_CARD,
                ),
            ),
            ticks=(23, 475, 628),
        ),
        id="a-repriced-owed-minute-is-judged-where-settlement-leaves-it",
    ),
    # 2,000 examples on PostgreSQL at fff9909: Twilio's clock 30 s behind, bank 10, no card,
    # two calls of three agents at once. The account was right (bank 0, owed 1200) but the
    # calls' shares were not: call 0 had all 10 banked minutes and call 1 owed 1200, where the
    # funding order gives call 0 7 minutes and 300 owed, call 1 3 minutes and 900 owed. Call
    # 1's unhold arrived 30 s after its stamp, so its first minutes fell due before three of
    # call 0's that the bank paid live (one on open time Twilio's hold took back). Settlement
    # now trades banked minutes between the account's settled calls (services/bank_shares.py).
    pytest.param(
        Scenario(
            skew=-30,
            bank=10,
            deposit=0,
            card=None,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=393,
                    agents=(
                        Agent("a0", join=13),
                        Agent("a1", join=134),
                        Agent("a2", join=102, hold=(146, 327)),
                    ),
                    customer_hold=(178, 270),
                    research=(Research("a0", start=371, stop=372, live=True),),
                ),
                Call(
                    start=148,
                    end=393,
                    agents=(
                        Agent("a0", join=13),
                        Agent("a1", join=0),
                        Agent("a2", join=0, hold=(103, 146)),
                    ),
                    customer_hold=(0, 178),
                ),
            ),
            ticks=(),
        ),
        id="two-calls-shares-of-the-bank-with-twilio-30-s-behind",
    ),
    # Found by 2,000 examples on PostgreSQL at a568339: Twilio's clock 27 s behind, bank 1,
    # deposit 150, no card, two calls. The account was right (bank 0, deposit 50, owed 1300),
    # but the deposit's minute went to call 1 where the funding order gives it to call 0:
    # meterd (0, 0, 600) and (1, 100, 700), the model (0, 100, 500) and (1, 0, 800).
    # Settlement traded the bank's minutes between calls by due time, not the deposit's
    # (fixed in services/call_shares.py).
    pytest.param(
        Scenario(
            skew=-27,
            bank=1,
            deposit=150,
            card=None,
            on_exhausted="announce",
            rates=(),
            deposits=(),
            calls=(
                Call(
                    start=10,
                    end=447,
                    agents=(Agent("a0", join=0), Agent("a1", join=0)),
                    customer_hold=(0, 268),
                    research=(Research("a0", start=447, stop=448, live=True),),
                ),
                Call(
                    start=231,
                    end=447,
                    agents=(Agent("a0", join=444), Agent("a1", join=0)),
                    research=(Research("a0", start=447, stop=448, live=True),),
                ),
            ),
            ticks=(),
        ),
        id="two-calls-shares-of-the-deposit-with-twilio-27-s-behind",
    ),
    # Found by 2,000 examples on PostgreSQL at 4f1052f, whose settlement also traded a late
    # banked minute with another call's earlier deposit-paid one: the banked minute was one of
    # a block bought once the deposit ran out, which the earlier minute could not have had.
    # meterd (3, 850) and (2, 1200), the model (2, 1000) and (3, 1050); the bank no longer
    # trades with the deposit.
    pytest.param(
        Scenario(
            skew=0,
            bank=2,
            deposit=2000,
            card="pm_card_visa",
            on_exhausted="allow_debt",
            rates=((134, 150), (1281, 100)),
            deposits=((74, 100),),
            calls=(
                Call(
                    start=10,
                    end=501,
                    agents=(
                        Agent(agent_id="a0", join=144, leave=None, hold=(167, 170)),
                        Agent(agent_id="a1", join=277, leave=None, hold=(291, 292)),
                    ),
                    customer_hold=(138, 500),
                    research=(
                        Research(agent_id="a0", start=187, stop=449, live=False),
                        Research(agent_id="a0", start=0, stop=277, live=True),
                    ),
                    waiver_at=None,
                    pay_token=None,
                ),
                Call(
                    start=226,
                    end=501,
                    agents=(
                        Agent(agent_id="a0", join=144, leave=None, hold=(167, 170)),
                        Agent(agent_id="a1", join=277, leave=None, hold=(291, 292)),
                    ),
                    customer_hold=(138, 500),
                    research=(
                        Research(agent_id="a1", start=187, stop=449, live=False),
                        Research(agent_id="a0", start=552, stop=829, live=True),
                    ),
                    waiver_at=None,
                    pay_token=None,
                ),
            ),
            ticks=(),
            card_mode="block",
        ),
        id="two-calls-a-late-block-s-minute-is-not-traded-for-a-deposit-minute",
    ),
]


@pytest.mark.parametrize("scenario", PAST_FAILURES)
def test_past_failures_agree_with_the_model(database_url, localstripe, scenario):
    assert normalise(scenario) == scenario  # as drawn: normalise has nothing left to move
    with _examples(database_url, localstripe, print) as play:
        play(scenario)


async def _gateway(localstripe: LocalStripe) -> StripeGateway:
    return StripeGateway(
        StripeSettings(secret_key=SECRET_KEY, api_base_url=localstripe.base_url, timeout_seconds=8)
    )


# --- the model itself, on the hand-worked figures of the existing tests and issue 11 ----------


def _one(*agents: Agent, end: int, **fields: Any) -> Call:
    return Call(10, end, tuple(agents), **fields)


def _scenario(*calls: Call, **fields: Any) -> Scenario:
    base: dict[str, Any] = {
        "skew": 0,
        "bank": 0,
        "deposit": 0,
        "card": None,
        "on_exhausted": "announce",
        "rates": (),
        "deposits": (),
    }
    return normalise(Scenario(calls=calls, **(base | fields)))


AUTHORISE = {"card": GOOD_CARD, "card_mode": "authorize"}
# Authorise card mode: each call's minutes that bank and deposit cannot pay are paid by money
# from its own authorisations (captured at settlement); no blocks. (scenario, account after
# settlement: bank, deposit, owed, card kept; agent-minutes per call)
AUTHORISE_EXAMPLES = [
    # defect 6's figures: 5 minutes from the deposit, then 5 x 100 captured
    pytest.param(
        _scenario(_one(Agent("a0", 0), end=600), deposit=500, **AUTHORISE),
        (0, 0, 0, 500),
        [{"a0": 10}],
        id="authorise-the-deposit-before-the-card",
    ),
    # two agents join while the deposit holds two minutes for one: 11 agent-minutes, 2 from the
    # deposit, 9 x 100 from the authorisation bought as they ran out
    pytest.param(
        _scenario(
            _one(Agent("a0", 0), Agent("a1", 130), Agent("a2", 130), end=300),
            deposit=200,
            **AUTHORISE,
        ),
        (0, 0, 0, 900),
        [{"a0": 5, "a1": 3, "a2": 3}],
        id="authorise-agents-joining-as-the-deposit-runs-out",
    ),
    # defect 10: a rate rise (100 -> 250 at 330) during a 20-minute call paid by the card from
    # the gate: 6 minutes at 100, 14 at 250, all captured
    pytest.param(
        _scenario(_one(Agent("a0", 0), end=1200), rates=((330, 250),), **AUTHORISE),
        (0, 0, 0, 4100),
        [{"a0": 20}],
        id="authorise-a-rate-rise-mid-call",
    ),
    # no funds, no card on file: the caller gives one at the gate; 3 minutes captured
    pytest.param(
        _scenario(_one(Agent("a0", 0), end=180, pay_token=GOOD_CARD), card_mode="authorize"),
        (0, 0, 0, 300),
        [{"a0": 3}],
        id="authorise-the-card-given-at-the-gate",
    ),
]


@pytest.mark.parametrize(
    "scenario", [pytest.param(p.values[0], id=p.id) for p in AUTHORISE_EXAMPLES]
)
def test_authorise_mode_examples_agree_with_the_model(database_url, localstripe, scenario):
    with _examples(database_url, localstripe, print) as play:
        play(scenario)


@pytest.mark.parametrize(
    ("scenario", "account", "minutes"),
    [
        # test_metering: 3000 s = 50 minutes, 45 banked then 5 x 100 from the deposit
        (
            _scenario(_one(Agent("a0", 0), end=3000), bank=45, deposit=2000),
            (0, 1500, 0, 0),
            [{"a0": 50}],
        ),
        # two agents, 180 s and 120 s: 5 agent-minutes
        (
            _scenario(_one(Agent("a0", 0, 180), Agent("a1", 0, 120), end=180), deposit=5000),
            (0, 4500, 0, 0),
            [{"a0": 3, "a1": 2}],
        ),
        # active 0..60 and 600..660, research 300..420 on hold: 4 minutes
        (
            _scenario(
                _one(
                    Agent("a0", 0, 660),
                    end=660,
                    customer_hold=(60, 600),
                    research=(Research("a0", 300, 420, live=False),),
                ),
                deposit=5000,
            ),
            (0, 4600, 0, 0),
            [{"a0": 4}],
        ),
        # the rate in force when each minute falls due: 100, 100, then 250 from 90 s
        (
            _scenario(_one(Agent("a0", 0, 180), end=180), deposit=10_000, rates=((100, 250),)),
            (0, 10_000 - 450, 0, 0),
            [{"a0": 3}],
        ),
        # issue 11 defect 6: bank 0, deposit 500, card: the deposit pays before the card
        (
            _scenario(_one(Agent("a0", 0), end=600), deposit=500, card=GOOD_CARD),
            (25, 0, 0, 3000),
            [{"a0": 10}],
        ),
        # defect 4: blocks bought during a waived call are all refunded
        (
            _scenario(
                _one(Agent("a0", 0), Agent("a1", 0), Agent("a2", 0), end=1500, waiver_at=2000),
                card=GOOD_CARD,
            ),
            (0, 0, 0, 0),
            [{"a0": 25, "a1": 25, "a2": 25}],
        ),
        # defect 7: two calls at once, one block suffices
        (
            _scenario(
                _one(Agent("a0", 0), end=600),
                dataclasses.replace(_one(Agent("a0", 0), end=600), start=200),
                card=GOOD_CARD,
            ),
            (10, 0, 0, 3000),
            [{"a0": 10}, {"a0": 10}],
        ),
        # announce: every minute is still written, owed; allow_debt: the deposit goes below 0
        (_scenario(_one(Agent("a0", 0), end=185), bank=3), (0, 0, 100, 0), [{"a0": 4}]),
        (
            _scenario(_one(Agent("a0", 0), end=180), deposit=150, on_exhausted="allow_debt"),
            (0, -150, 0, 0),
            [{"a0": 3}],
        ),
        *((example.values[0], *example.values[1:]) for example in AUTHORISE_EXAMPLES),
    ],
)
def test_the_model_gives_the_hand_worked_figures(scenario, account, minutes):
    prediction = predict(scenario)
    outcome = prediction.outcomes[0]
    assert (outcome.bank, outcome.deposit, outcome.owed, outcome.card_kept) == account
    assert all(o == outcome for o in prediction.outcomes)
    assert [prediction.agent_minutes(i) for i in range(len(scenario.calls))] == minutes
    assert prediction.account_problem(*account) == ""


def test_the_model_gate_uses_the_rate_in_force():
    """Issue 11 defect 9: rate 250 with deposit 150 is not funded; rate 50 with 80 is."""
    call = _one(Agent("a0", 0), end=60)
    assert not predict(_scenario(call, deposit=150, rates=((1, 250),))).connected(0)
    assert predict(_scenario(call, deposit=80, rates=((1, 50),))).connected(0)


def test_the_model_wants_minute_one_within_2_seconds_whatever_the_skew():
    for skew in (-30, -2, 0, 2, 30):
        prediction = predict(_scenario(_one(Agent("a0", 100), end=300), bank=45, skew=skew))
        # the agent joins at 110 on meterd's clock: minute 1 by 112, minute 2 by 172, or as
        # late as Twilio's clock is ahead
        late = max(skew, 0)
        assert [
            prediction.required_live(0, "a0", t) for t in (111, 112, 171 + late, 172 + late)
        ] == [0, 1, 1, 2]


def test_the_model_lets_a_block_bought_ahead_pay_bank_first_what_the_deposit_held():
    """The past failure's figures: 16 agent-minutes from bank 10 and deposit 150, one block.
    Bought when the funds (one minute) could not pay the next minute of both agents accruing,
    the block pays bank first the minute the deposit held (bank 24, deposit 150); the model,
    buying it once nothing can pay, shows bank 25, deposit 50. Both are within the rules; more
    minutes moved than the deposit held, or another block, are not."""
    prediction = predict(PAST_FAILURES[0].values[0])
    assert [
        (o.bank, o.deposit, o.card_kept, o.block_ahead_minutes) for o in prediction.outcomes
    ] == [(25, 50, 3000, 1)]
    assert prediction.account_problem(25, 50, 0, 3000) == ""
    assert prediction.exact_outcome is not None
    assert prediction.account_problem(24, 150, 0, 3000) == ""
    assert prediction.exact_outcome is None  # splits are not compared then
    assert prediction.account_problem(23, 250, 0, 3000) != ""  # two minutes: the deposit held one
    assert prediction.account_problem(24, 50, 0, 3000) != ""
    assert prediction.account_problem(54, 150, 0, 6000) != ""


def test_the_model_still_wants_the_deposit_before_the_block_with_one_agent():
    """Issue 11 defect 6 (bank 0, deposit 500, card, one agent for 10 minutes): the block is
    bought only once the deposit cannot pay a minute, so 20 / 500 (the block bought at once,
    the deposit left untouched) stays wrong."""
    prediction = predict(_scenario(_one(Agent("a0", 0), end=600), deposit=500, card=GOOD_CARD))
    assert all(o.block_ahead_minutes == 0 for o in prediction.outcomes)
    assert prediction.account_problem(25, 0, 0, 3000) == ""
    assert prediction.account_problem(20, 500, 0, 3000) != ""


def test_the_model_lets_a_block_bought_ahead_pay_bank_first_what_was_deposited_later():
    """The second past failure's figures: 5 agent-minutes from bank 1, a deposit of 100 made at
    14 and one block. Once the bank's minute is paid nothing can pay the next one, so meterd may
    buy the block then; the deposit comes after it and the bank pays first (bank 26, deposit
    100). The model, buying the block once nothing can pay, pays a minute from the late deposit
    (bank 27, deposit 0). Both are within the rules; two minutes moved (the model paid one from
    the deposit after that moment), one moved without its money, or another block, are not."""
    prediction = predict(PAST_FAILURES[1].values[0])
    assert [
        (o.bank, o.deposit, o.card_kept, o.block_ahead_minutes) for o in prediction.outcomes
    ] == [(27, 0, 3000, 1)]
    assert prediction.account_problem(27, 0, 0, 3000) == ""
    assert prediction.exact_outcome is not None
    assert prediction.account_problem(26, 100, 0, 3000) == ""
    assert prediction.exact_outcome is None  # splits are not compared then
    assert prediction.account_problem(25, 100, 0, 3000) != ""
    assert prediction.account_problem(25, 200, 0, 3000) != ""
    assert prediction.account_problem(26, 0, 0, 3000) != ""
    assert prediction.account_problem(56, 100, 0, 6000) != ""


def test_the_model_counts_only_deposit_minutes_paid_after_the_block_may_be_bought():
    """One agent, bank 0, deposit 500 and a card, and 300 more deposited at 280: the first five
    minutes are the deposit's (defect 6); the block may be bought once they are paid (at 250,
    before the deposit), and the late deposit's minutes may then be paid from the bank, where
    the model, buying the block once nothing can pay, pays them from the deposit. So up to 3
    minutes move (the late 300), never the first deposit's 5."""
    prediction = predict(
        _scenario(
            _one(Agent("a0", 0), end=600), deposit=500, deposits=((280, 300),), card=GOOD_CARD
        )
    )
    assert [
        (o.bank, o.deposit, o.card_kept, o.block_ahead_minutes) for o in prediction.outcomes
    ] == [(28, 0, 3000, 3)]
    assert prediction.account_problem(28, 0, 0, 3000) == ""
    assert prediction.account_problem(26, 200, 0, 3000) == ""
    assert prediction.account_problem(25, 300, 0, 3000) == ""
    assert prediction.account_problem(24, 400, 0, 3000) != ""
    assert prediction.account_problem(20, 800, 0, 3000) != ""


def test_the_model_lets_one_more_block_pay_bank_first_what_was_deposited_later():
    """The third past failure's figures: 5 agent-minutes from bank 1 and deposits of 100 (at 1)
    and 1000 (at 196). Once the first call's second minute is paid nothing is left and an agent
    is accruing, so meterd may buy a block then; the model needs none (the deposit of 1000 pays
    the second call), so that block is one more, and it may pay bank first the 3 minutes the
    model paid from the late deposit (bank 27, deposit 1000), or none (bank 30, deposit 700).
    Minutes moved without their money, more minutes than the model paid from the deposit after
    that moment, or a second block, are not within the rules."""
    prediction = predict(PAST_FAILURES[2].values[0])
    assert [
        (o.bank, o.deposit, o.card_kept, o.early_block_possible, o.early_block_minutes)
        for o in prediction.outcomes
    ] == [(0, 700, 0, True, 3)]
    assert prediction.account_problem(0, 700, 0, 0) == ""
    assert prediction.account_problem(27, 1000, 0, 3000) == ""
    assert prediction.account_problem(30, 700, 0, 3000) == ""
    assert prediction.account_problem(27, 900, 0, 3000) != ""
    assert prediction.account_problem(26, 1100, 0, 3000) != ""  # the first call's deposit minute
    assert prediction.account_problem(-3, 1000, 0, 0) != ""
    assert prediction.account_problem(57, 1000, 0, 6000) != ""


def test_the_model_wants_a_block_for_research_after_the_hang_up():
    """The meterd defect's figures (PAST_FAILURES[3]): 7 agent-minutes, 5 from the deposit of
    500, the last 2 researched after the hang-up. A usable card is on file, so a block pays them
    (bank 28); owing them (meterd: owed 200, no block) is not within the rules."""
    prediction = predict(PAST_FAILURES[3].values[0])
    assert [(o.bank, o.deposit, o.owed, o.card_kept) for o in prediction.outcomes] == [
        (28, 0, 0, 3000)
    ]
    assert prediction.agent_minutes(0) == {"a0": 1, "a1": 5, "a2": 1}
    assert prediction.account_problem(28, 0, 0, 3000) == ""
    assert prediction.account_problem(0, 0, 200, 0) != ""


def test_the_model_wants_the_deposit_to_pay_what_a_minute_given_back_held():
    """The meterd defect's figures (PAST_FAILURES[4]): a1 billable 71 s (2 minutes), a0 51 s
    (1 minute) by Twilio's stamps; bank 2 pays two, the deposit the third (150 -> 50). What
    meterd shows (a0's phantom minute 2 given back, a1's minute 2 left owed: deposit 150,
    owed 100) is not within the rules."""
    prediction = predict(PAST_FAILURES[4].values[0])
    assert prediction.agent_minutes(0) == {"a0": 1, "a1": 2}
    assert [(o.bank, o.deposit, o.owed, o.card_kept) for o in prediction.outcomes] == [
        (0, 50, 0, 0)
    ]
    assert prediction.account_problem(0, 50, 0, 0) == ""
    assert prediction.account_problem(0, 150, 100, 0) != ""


def _past_failure(name: str) -> Scenario:
    (scenario,) = next(p.values for p in PAST_FAILURES if p.id == name)
    return scenario


def test_the_model_settles_owed_minutes_from_a_block_bought_later():
    """Settlement 3 (docs/billing.md) in the model: call 0's owed minute is paid at its
    settlement from the block call 1's caller bought (bank 30 - 1 - 1 = 28), not left owed."""
    prediction = predict(_past_failure("settlement-pays-an-owed-minute-from-a-block-bought-later"))
    assert {(o.bank, o.deposit, o.owed, o.card_kept) for o in prediction.outcomes} == {
        (28, 0, 0, 3000)
    }
    assert prediction.account_problem(28, 0, 0, 3000) == ""
    assert prediction.account_problem(29, 0, 100, 3000) != ""


def test_the_model_lets_the_block_pay_the_deposit_minutes_after_an_owed_one():
    """Settlement 3: minutes 2, 3 and 5 owed and minute 4 from the deposit when the card was
    asked for the block; the block pays all four: bank 25, deposit 80 (meterd showed 26 / 30)."""
    scenario = _past_failure("a-deposit-minute-after-an-owed-minute-is-paid-by-its-block")
    prediction = predict(scenario)
    assert prediction.account_problem(25, 80, 0, 3000) == ""
    assert prediction.account_problem(26, 30, 0, 3000) != ""
