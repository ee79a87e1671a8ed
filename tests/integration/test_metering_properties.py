"""Hypothesis: random calls delivered with duplicates and in any order (within the settlement
delay, as Twilio's retries are), interleaved with live ticks at random moments. After
settlement, each call's ledger equals the pure rating of its final timeline, and every
invariant `meterd ledger check` knows holds. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterd.config import load_settings
from meterd.core import ledger, rating
from meterd.core.timeline import build_timeline
from meterd.services.ledger_check import check_ledger
from meterd.store import calls_store, ledger_store, timeline_store
from meterd.store.database import open_database
from meterd.web.app import SERVICES, create_app
from tests.call_scripts import CallScript

from .twilio_app import ManualClock

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
RATE = 100


@st.composite
def calls(draw):
    """A call: the customer joins at 0; 1 to 3 agents join, maybe hold, leave; maybe the
    customer is held; the customer hangs up at the end."""
    script_steps = [("join", "customer", 0)]
    end = draw(st.integers(30, 1500))
    for index in range(draw(st.integers(1, 3))):
        who = f"agent:a{index}"
        joined = draw(st.integers(0, end - 1))
        left = draw(st.integers(joined, end))
        script_steps.append(("join", who, joined))
        if draw(st.booleans()) and left - joined > 2:
            held = draw(st.integers(joined + 1, left - 1))
            script_steps += [("hold", who, held), ("unhold", who, draw(st.integers(held, left)))]
        script_steps.append(("leave", who, left))
    if draw(st.booleans()):
        held = draw(st.integers(0, end))
        script_steps += [
            ("hold", "customer", held),
            ("unhold", "customer", draw(st.integers(held, end))),
        ]
    research = []
    if draw(st.booleans()):
        start = draw(st.integers(0, end))
        research.append(("a0", start, start + draw(st.integers(1, 600))))
    return sorted(script_steps, key=lambda s: s[2]), end, research


def _script(n: int, steps, end: int) -> CallScript:
    script = CallScript(n, START, from_number=f"+1415{n % 10**7:07d}")
    for action, who, offset in steps:
        getattr(script, action)(who, offset)
    script.end(end)
    return script


async def _example(database, tmp_path, call, seed: int, bank_minutes: int) -> None:
    steps, end, research = call
    rng = random.Random(seed)
    clock = ManualClock(START)
    app = create_app(
        load_settings(
            None,
            {
                "METERD_STATE_DIR": str(tmp_path),
                "METERD_SETTLE_DELAY_SECONDS": "60",
                "METERD_ON_EXHAUSTED": "allow_debt",
                "METERD_PIN_SECRET": "pin-secret-0123456789ab",
            },
        ),
        database,
        clock=clock,
    )
    services = app[SERVICES]
    n = uuid.uuid4().int % 10**15  # a fresh call every example
    account_id = f"p{uuid.uuid4().hex[:10]}"
    script = _script(n, steps, end)
    await services.accounts.create(
        {
            "account_id": account_id,
            "name": "p",
            "plan": "per_minute",
            "caller_ids": [script.from_number],
        }
    )
    await services.accounts.deposit(account_id, {"amount_minor": 10**6, "reference": "d"})
    if bank_minutes:
        await services.accounts.grant_minutes(
            account_id, {"minutes": bank_minutes, "reference": "b"}
        )
    answer = await services.answering.incoming(script.voice(), list(script.voice().items()))
    assert answer.action.value == "connect"

    deliveries = list(script.events) + rng.sample(script.events, min(3, len(script.events)))
    rng.shuffle(deliveries)
    for params in deliveries:
        clock.now = max(clock.now, START + dt.timedelta(seconds=rng.randint(0, end + 30)))
        await services.ingest.conference_event(params, list(params.items()))
        if rng.random() < 0.5:
            await services.metering.tick()
    for agent, start, stop in research:
        clock.now = max(clock.now, START + dt.timedelta(seconds=stop))
        await services.research.flag(
            {
                "call_sid": script.call_sid,
                "agent_id": agent,
                "start": script.at(start).isoformat(),
                "end": script.at(stop).isoformat(),
            }
        )
    for params in script.status_events:
        await services.ingest.call_status(params, list(params.items()))
    clock.now = max(clock.now, START + dt.timedelta(seconds=end + 700)) + dt.timedelta(seconds=61)
    await services.metering.tick()

    async with database.read() as connection:
        call_row = await calls_store.get_call(connection, script.call_sid)
        assert call_row.settled_at is not None
        events = await timeline_store.conference_events(connection, script.call_sid)
        marks = await calls_store.marks(connection, script.call_sid)
        totals = await ledger_store.call_book_totals(connection, script.call_sid)
    final = build_timeline(
        events,
        marks,
        now_seconds=int(clock.now.timestamp()),
        research_max_seconds=7200,
        call_ended_at_seconds=int(script.at(end).timestamp()),
    )
    expected_minutes = rating.total_minutes((t.billable_seconds for t in final.agents.values()), 60)
    assert totals.get(ledger.MINUTES_USED, 0) == expected_minutes
    bank_used = -totals.get(ledger.bank_book(account_id), 0)
    deposit_used = -totals.get(ledger.deposit_book(account_id), 0)
    assert bank_used == min(bank_minutes, expected_minutes)  # the bank comes first
    assert deposit_used == (expected_minutes - bank_used) * RATE


def test_after_settlement_every_call_equals_the_rating_of_its_final_timeline(
    database_url, tmp_path
):
    with asyncio.Runner() as runner:
        database = runner.run(open_database(database_url))
        try:

            @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
            @given(
                call=calls(), seed=st.integers(0, 10**6), bank_minutes=st.sampled_from([0, 2, 45])
            )
            def check(call, seed, bank_minutes):
                runner.run(_example(database, tmp_path, call, seed, bank_minutes))

            check()
            report = runner.run(check_ledger(database))
            assert report.ok, report.breaches
        finally:
            runner.run(database.close())
