"""A call whose minutes fell due while nobody metered it (a join a day old: the daemon was
stopped, or the tick fell behind) is caught up in bounded transactions: at most
MINUTES_PER_TRANSACTION_MAX minutes of one call per transaction, webhooks let in between them;
settlement posts such a backlog the same way before it settles (issue 12, finding 0). SQLite
and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from meterd.services.ledger_check import check_ledger
from meterd.services.minute_posting import MINUTES_PER_TRANSACTION_MAX
from meterd.store.schema import calls

from .test_metering import START, account, call_view, deliver, metering, start_call
from .twilio_app import ManualClock, build_app

DAY_SECONDS = 24 * 60 * 60


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    return await aiohttp_client(
        build_app(database, tmp_path, clock, METERD_SETTLE_DELAY_SECONDS="60")
    )


async def next_due(database, call_sid: str) -> dt.datetime | None:
    async with database.read() as connection:
        return await connection.scalar(
            calls.select()
            .with_only_columns(calls.c.next_due_at)
            .where(calls.c.call_sid == call_sid)
        )


def transactions_posted(client) -> list[int]:
    """Minutes posted by each metering transaction from now on."""
    poster = metering(client)._poster
    posted: list[int] = []
    post_due_minutes = poster.post_due_minutes

    async def spy(*args, **kwargs):
        result = await post_due_minutes(*args, **kwargs)
        posted.append(result[0])
        return result

    poster.post_due_minutes = spy
    return posted


async def test_a_day_of_backlog_is_posted_in_bounded_batches(client, clock, database):
    await account(client, plan="service_agreement", valid_until="2030-01-01")
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    clock.advance(DAY_SECONDS - 30)  # nobody metered for a day: 1440 minutes due at once
    batches = transactions_posted(client)
    ticks = 0
    while (await metering(client).tick()).minutes_posted:
        ticks += 1
        if sum(batches) < 1440:  # more due: the next tick goes on at once
            assert await next_due(database, script.call_sid) == clock.now
    assert max(batches) == MINUTES_PER_TRANSACTION_MAX  # each transaction short
    assert sum(batches) == 1440
    assert len([b for b in batches if b]) == 1440 // MINUTES_PER_TRANSACTION_MAX
    assert ticks >= 1
    assert (await call_view(client, script))["agents"]["alice"]["agent_minutes"] == 1440
    assert (await check_ledger(database)).ok


async def test_a_backlog_lets_a_waiting_webhook_in_between_its_transactions(
    client, clock, database
):
    """The tick yields between a backlog's transactions: a webhook that waits for the database
    is recorded after a few of them (the webhook's own path takes a few turns of the event
    loop: HTTP, the writer's queue, a connection), not after the whole day's 1,440 minutes."""
    await account(client, plan="service_agreement", valid_until="2030-01-01")
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    clock.advance(DAY_SECONDS - 30)
    batches = transactions_posted(client)
    script.hold("customer", DAY_SECONDS - 40)
    tick = asyncio.create_task(metering(client).tick())
    for _ in range(1000):  # until the first transaction of the backlog is done
        if batches:
            break
        await asyncio.sleep(0)
    await deliver(client, script.events[-1:])
    posted_before_the_webhook = sum(batches)
    await tick
    # one run in a few on a quiet machine saw 3 transactions on PostgreSQL (45 minutes)
    assert posted_before_the_webhook <= 10 * MINUTES_PER_TRANSACTION_MAX


async def test_settlement_of_a_large_backlog_posts_it_in_bounded_transactions_first(
    client, clock, database
):
    """1000 minutes none of which was metered live (the whole call delivered at once): the
    call settles at the first tick (whatever the machine's speed), its minutes posted 15 a
    transaction before the settling one."""
    await account(client, plan="service_agreement", valid_until="2030-01-01")
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    end = 1000 * 60  # 1000 minutes, none metered live
    script.leave("agent:alice", end).end(end)
    await deliver(client, script.events[3:] + script.status_events)
    clock.now = START + dt.timedelta(seconds=end + 61)
    batches = transactions_posted(client)
    report = await metering(client).tick()
    assert report.calls_settled == 1
    assert max(batches) <= MINUTES_PER_TRANSACTION_MAX and sum(batches) == 1000
    view = await call_view(client, script)
    assert view["settled_at"] is not None
    assert view["agents"]["alice"]["agent_minutes"] == 1000
    assert (await check_ledger(database)).ok
