"""Waiving one call of a linked incident group (issue 11): the waived call gives back exactly
the incidents posted on it; the other calls keep theirs; the waived call's time no longer counts
toward the group's later incidents. Incident price 5000; deposit 20000. On SQLite and
PostgreSQL; `ledger check` passes after each."""

from __future__ import annotations

import pytest

from meterd.services.ledger_check import check_ledger
from tests.call_scripts import CallScript

from .test_metering import (
    START,
    account,
    agents,
    balances,
    call_view,
    deliver,
    finish,
    metering,
    post_twilio,
    start_call,
)
from .twilio_app import ManualClock, build_app


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    return await aiohttp_client(
        build_app(database, tmp_path, clock, METERD_SETTLE_DELAY_SECONDS="60")
    )


async def first_call(client, clock, seconds: int) -> CallScript:
    first = await start_call(client, 1)
    first.join("customer", 0).join("agent:alice", 0).leave("agent:alice", seconds).end(seconds)
    await deliver(client, first.events + first.status_events)
    await finish(client, clock, first, seconds)
    return first


async def linked_follow_up(client, clock, first: CallScript, seconds: int) -> CallScript:
    follow_up = CallScript(2, clock.now)
    twiml = await (await post_twilio(client, "/twilio/voice", follow_up.voice())).text()
    assert "<Conference" in twiml
    link = await agents(
        client,
        "/agents/incident-link",
        {"call_sid": follow_up.call_sid, "incident_call_sid": first.call_sid},
    )
    assert link.status == 200
    follow_up.join("customer", 0).join("agent:bob", 0).leave("agent:bob", seconds).end(seconds)
    await deliver(client, follow_up.events + follow_up.status_events)
    clock.now = follow_up.at(seconds + 61)
    await metering(client).tick()
    assert (await call_view(client, follow_up))["settled_at"] is not None
    return follow_up


async def waive(client, script: CallScript) -> None:
    body = {"call_sid": script.call_sid, "agent_id": "alice", "reason": "software_defect"}
    assert (await agents(client, "/agents/waiver", body)).status == 200


async def test_waiving_the_follow_up_gives_back_only_its_own_incident(client, clock, database):
    await account(client, plan="per_incident", deposit_minor=20_000)
    first = await first_call(client, clock, 1800)  # 30 min: incident 1, on the first call
    follow_up = await linked_follow_up(client, clock, first, 6000)  # 130 min: incident 2
    assert await balances(client) == (45, 10_000)
    await waive(client, follow_up)
    # the follow-up's incident 2 comes back; the first call keeps incident 1
    assert await balances(client) == (45, 15_000)
    assert (await call_view(client, first))["charges"]["incidents"] == 1
    assert (await check_ledger(database)).ok


async def test_a_waived_first_call_no_longer_covers_its_follow_up(client, clock, database):
    await account(client, plan="per_incident", deposit_minor=20_000)
    first = await first_call(client, clock, 1800)
    await waive(client, first)
    assert await balances(client) == (45, 20_000)  # incident 1 given back
    # the follow-up's 60 minutes are an incident of their own now: charged under the next key
    follow_up = await linked_follow_up(client, clock, first, 3600)
    assert await balances(client) == (45, 15_000)
    assert (await call_view(client, follow_up))["charges"]["incidents"] == 1
    assert (await call_view(client, first))["charges"]["incidents"] == 0
    assert (await check_ledger(database)).ok


async def test_waiving_every_call_of_the_group_gives_everything_back(client, clock, database):
    await account(client, plan="per_incident", deposit_minor=20_000)
    first = await first_call(client, clock, 1800)
    follow_up = await linked_follow_up(client, clock, first, 6000)
    await waive(client, follow_up)
    await waive(client, first)
    assert await balances(client) == (45, 20_000)
    assert (await check_ledger(database)).ok
