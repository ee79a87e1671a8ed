"""Group commit of Twilio's conference and call-status callbacks (issue 15), in-process, on SQLite
and PostgreSQL: one writer records every callback waiting in one transaction and answers each
only after that commit; a refused callback refuses only itself; a full queue answers 503.

The writer is held inside its transaction by `HeldWrites` (the batch's statements have run, the
commit has not), which is how these tests line callbacks up in one batch and look at what a
handler has answered before the commit."""

from __future__ import annotations

import asyncio
import datetime as dt
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select

from meterd.services.errors import InvalidRequest, NotFound
from meterd.services.ingest import Callback, Recorded
from meterd.store.schema import calls, webhook_events
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.twilio_payloads import conference_params, sid

from .helpers import make_account
from .twilio_app import ManualClock, build_app, post_twilio

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
CALLS = 6


class HeldWrites:
    """Wraps `database.write`: each write transaction, once its block has run, waits for
    `release` before it commits (or fails with `failure`, as a failed commit would)."""

    def __init__(self, database) -> None:
        self._real = database.write
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.failure: Exception | None = None
        self.transactions = 0
        database.write = self.write

    @asynccontextmanager
    async def write(self):
        self.transactions += 1
        async with self._real() as connection:
            yield connection
            self.entered.set()
            await self.release.wait()
            if self.failure is not None:
                raise self.failure


@pytest.fixture
def clock():
    return ManualClock(START)


async def _client(aiohttp_client, database, tmp_path, clock, **env):
    await make_account(
        database, "acme", plan="service_agreement", products=[], caller_ids=[CUSTOMER_NUMBER]
    )
    return await aiohttp_client(build_app(database, tmp_path, clock, **env))


async def _scripts(client, count: int = CALLS) -> list[CallScript]:
    scripts = []
    for n in range(1, count + 1):
        script = CallScript(n, START)
        script.join("customer", 0).join("agent:alice", 10).hold("customer", 70)
        script.unhold("customer", 100).leave("agent:alice", 200).end(205)
        response = await post_twilio(client, "/twilio/voice", script.voice())
        assert "<Conference" in await response.text()
        scripts.append(script)
    return scripts


async def _stored(database) -> list[str]:
    async with database.read() as connection:
        rows = await connection.execute(
            select(webhook_events.c.dedup_key).where(webhook_events.c.route == "conference")
        )
        return sorted(row[0] for row in rows)


def _key(params: dict[str, str]) -> str:
    return f"conference:{params['ConferenceSid']}:{params['SequenceNumber']}"


def _unknown_call() -> dict[str, str]:
    return conference_params(sid("CF", 999), sid("CA", 999), "conference-start", 0, START)


def _before_the_call(script: CallScript) -> dict[str, str]:
    """A callback stamped two days before its call began: 400."""
    return conference_params(
        script.conference_sid,
        script.call_sid,
        "conference-start",
        99,
        START - dt.timedelta(days=2),
    )


async def _until(condition) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the writer's queue has no event to wait on
            await asyncio.sleep(0.01)


async def test_concurrent_callbacks_are_recorded_once_and_a_refused_one_refuses_only_itself(
    aiohttp_client, database, tmp_path, clock
):
    client = await _client(aiohttp_client, database, tmp_path, clock)
    scripts = await _scripts(client)
    writer = client.app[SERVICES].intake.writer
    held = HeldWrites(database)
    first = asyncio.ensure_future(post_twilio(client, "/twilio/conference", scripts[0].events[0]))
    await held.entered.wait()  # the writer holds a batch of one: the rest queue behind it
    good = [params for script in scripts for params in script.events][1:]
    refused = [_unknown_call(), _before_the_call(scripts[2])]
    sent = [*good[:10], refused[0], *good[10:20], refused[1], *good[20:], *good[:5]]
    answers = [
        asyncio.ensure_future(post_twilio(client, "/twilio/conference", params)) for params in sent
    ]
    await _until(lambda: writer.depth == len(sent))
    held.release.set()
    assert (await first).status == 204
    statuses = [(await answer).status for answer in answers]
    assert statuses == [204] * 10 + [404] + [204] * 10 + [400] + [204] * (len(good) - 20 + 5)
    # every good callback once, nothing of the refused ones; the repeats changed nothing
    assert await _stored(database) == sorted(_key(p) for s in scripts for p in s.events)
    sizes = {sample.name: sample.value for sample in writer.batch_sizes.collect()[0].samples}
    # two transactions: the first callback's, then every other one at once
    assert (sizes["meterd_webhook_batch_size_count"], sizes["meterd_webhook_batch_size_sum"]) == (
        2,
        1 + len(sent),
    )
    async with database.read() as connection:
        ended = await connection.scalar(
            select(func.count()).select_from(calls).where(calls.c.end_reason == "conference-end")
        )
    assert ended == CALLS


async def test_a_batch_refuses_a_bad_callback_alone_and_records_the_others(
    aiohttp_client, database, tmp_path, clock
):
    client = await _client(aiohttp_client, database, tmp_path, clock)
    scripts = await _scripts(client, 2)
    ingest = client.app[SERVICES].ingest
    one, two = scripts[0].events[:3], scripts[1].events[:3]
    batch = [*one[:2], _unknown_call(), _before_the_call(scripts[1]), *two, one[2], one[0]]
    outcomes = await ingest.record_batch(
        [Callback("conference", params, list(params.items()), START) for params in batch]
    )
    kinds = [type(outcome) for outcome in outcomes]
    assert kinds == [Recorded, Recorded, NotFound, InvalidRequest] + [Recorded] * 5
    assert [outcome.new for outcome in outcomes if isinstance(outcome, Recorded)] == [
        True,
        True,
        True,
        True,
        True,
        True,
        False,  # the repeat of one[0] in the same batch: nothing changed
    ]
    assert await _stored(database) == sorted(_key(p) for p in one + two)


async def test_a_batch_records_what_the_same_callbacks_record_one_at_a_time(
    aiohttp_client, database, tmp_path, clock
):
    """Calls 1-3 get their callbacks in one batch, calls 11-13 the same callbacks one at a
    time: the calls' rows and events are the same."""
    client = await _client(aiohttp_client, database, tmp_path, clock)
    ingest = client.app[SERVICES].ingest
    batched, single = [], []
    for n in (1, 2, 3):
        for group, number in ((batched, n), (single, n + 10)):
            script = CallScript(number, START)
            script.join("customer", 0).join("agent:a", 5).hold("customer", 40 + n)
            script.unhold("customer", 90).leave("agent:a", 120 + n).end(130 + n)
            await post_twilio(client, "/twilio/voice", script.voice())
            group.append(script)
    clock.advance(3)
    order = [(s, i) for i in (5, 0, 2, 1, 4, 3, 2, 6) for s in range(3)]  # out of order, repeats
    await ingest.record_batch(
        [
            Callback("conference", p, list(p.items()), START + dt.timedelta(seconds=k))
            for k, (s, i) in enumerate(order)
            for p in [batched[s].events[i]]
        ]
    )
    for k, (s, i) in enumerate(order):
        params = single[s].events[i]
        await ingest.conference_event(
            params, list(params.items()), received_at=START + dt.timedelta(seconds=k)
        )

    async def state(script: CallScript):
        async with database.read() as connection:
            call = (
                await connection.execute(select(calls).where(calls.c.call_sid == script.call_sid))
            ).one()
            events = await connection.execute(
                select(webhook_events.c.sequence_number, webhook_events.c.kind)
                .where(webhook_events.c.call_sid == script.call_sid)
                .where(webhook_events.c.route == "conference")
                .order_by(webhook_events.c.sequence_number)
            )
            return (
                call.last_event_at,
                call.next_due_at,
                call.conference_sid is not None,
                call.ended_at,
                call.end_reason,
                call.status,
                [tuple(row) for row in events],
            )

    for one_batch, one_at_a_time in zip(batched, single, strict=True):
        assert await state(one_batch) == await state(one_at_a_time)


async def test_no_callback_is_answered_before_the_commit_that_holds_it(
    aiohttp_client, database, tmp_path, clock
):
    client = await _client(aiohttp_client, database, tmp_path, clock)
    (script,) = await _scripts(client, 1)
    held = HeldWrites(database)
    answer = asyncio.ensure_future(post_twilio(client, "/twilio/conference", script.events[0]))
    await held.entered.wait()  # written, not committed
    await asyncio.sleep(0.2)
    assert not answer.done()
    assert await _stored(database) == []  # another connection sees nothing yet
    held.release.set()
    assert (await answer).status == 204
    assert await _stored(database) == [_key(script.events[0])]


async def test_a_failed_commit_answers_no_callback_of_its_batch_2xx(
    aiohttp_client, database, tmp_path, clock
):
    client = await _client(aiohttp_client, database, tmp_path, clock)
    (script,) = await _scripts(client, 1)
    held = HeldWrites(database)
    held.failure = RuntimeError("the commit failed")
    answers = [
        asyncio.ensure_future(post_twilio(client, "/twilio/conference", params))
        for params in script.events
    ]
    await held.entered.wait()
    await asyncio.sleep(0.2)
    assert not any(answer.done() for answer in answers)
    held.release.set()
    assert [(await answer).status for answer in answers] == [500] * len(answers)
    assert await _stored(database) == []
    assert client.app[SERVICES].intake.journal_entries == 0


async def test_a_commit_failed_by_an_outage_sends_its_batch_to_the_journal(
    aiohttp_client, database, tmp_path, clock
):
    """...which is then applied in one transaction, a refused entry dropped alone."""
    client = await _client(aiohttp_client, database, tmp_path, clock)
    (script,) = await _scripts(client, 1)
    held = HeldWrites(database)
    held.failure = sa_exc.DisconnectionError("the database went away at the commit")
    sent = [*script.events[:3], _unknown_call(), *script.events[3:]]
    answers = [
        asyncio.ensure_future(post_twilio(client, "/twilio/conference", params)) for params in sent
    ]
    await held.entered.wait()
    assert not any(answer.done() for answer in answers)
    held.release.set()
    assert [(await answer).status for answer in answers] == [204] * len(sent)
    intake = client.app[SERVICES].intake
    assert intake.journal_entries == len(sent)  # journaled, then answered
    assert await _stored(database) == []
    held.failure, before = None, held.transactions
    assert await intake.replay() == len(sent)
    assert held.transactions - before == 1
    assert await _stored(database) == sorted(_key(p) for p in script.events)
    metrics = await (await client.get("/metrics")).text()
    assert 'meterd_webhook_journal_replays_total{outcome="refused"} 1.0' in metrics
    assert f'meterd_webhook_journal_replays_total{{outcome="applied"}} {len(sent) - 1}.0' in metrics


async def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing_acknowledged(
    aiohttp_client, database, tmp_path, clock
):
    client = await _client(aiohttp_client, database, tmp_path, clock, METERD_WEBHOOK_QUEUE_MAX="3")
    (script,) = await _scripts(client, 1)
    held = HeldWrites(database)
    first, *rest = script.events
    taken = asyncio.ensure_future(post_twilio(client, "/twilio/conference", first))
    await held.entered.wait()  # the writer holds the first; three more fill the queue
    queued = [
        asyncio.ensure_future(post_twilio(client, "/twilio/conference", params))
        for params in rest[:3]
    ]
    writer = client.app[SERVICES].intake.writer
    await _until(lambda: writer.depth == 3)
    refused = [await post_twilio(client, "/twilio/conference", params) for params in rest[3:]]
    assert [response.status for response in refused] == [503] * len(rest[3:])
    assert {response.headers["Retry-After"] for response in refused} == {"1"}
    assert (await refused[0].json())["error"] == "overloaded"
    metrics = await (await client.get("/metrics")).text()
    assert f'meterd_webhook_queue_full_total{{route="conference"}} {len(rest[3:])}.0' in metrics
    held.release.set()
    acknowledged = [first, *rest[:3]]
    assert [(await answer).status for answer in [taken, *queued]] == [204] * 4
    assert await _stored(database) == sorted(_key(p) for p in acknowledged)
    for params in rest[3:]:  # Twilio's retries
        assert (await post_twilio(client, "/twilio/conference", params)).status == 204
    assert await _stored(database) == sorted(_key(p) for p in script.events)


async def test_the_writer_records_what_it_holds_before_it_stops(
    aiohttp_client, database, tmp_path, clock
):
    client = await _client(aiohttp_client, database, tmp_path, clock)
    (script,) = await _scripts(client, 1)
    intake = client.app[SERVICES].intake
    held = HeldWrites(database)
    answers = [
        asyncio.ensure_future(post_twilio(client, "/twilio/conference", params))
        for params in script.events
    ]
    await held.entered.wait()
    stopping = asyncio.ensure_future(intake.stop(10))
    await asyncio.sleep(0.1)
    assert not stopping.done()  # it waits for the batches it holds
    held.release.set()
    await stopping
    assert [(await answer).status for answer in answers] == [204] * len(answers)
    assert await _stored(database) == sorted(_key(p) for p in script.events)
    late = await post_twilio(client, "/twilio/conference", script.events[0])
    assert late.status == 503  # stopped: Twilio retries at the next daemon


async def test_a_callback_the_database_is_slow_to_take_is_journaled_and_recorded_once(
    aiohttp_client, database, tmp_path, clock
):
    """Past webhook_journal_wait_ms the callback is answered from the journal: one the writer
    holds finishes on its own, one still queued is withdrawn; applying the journal records each
    once."""
    client = await _client(
        aiohttp_client, database, tmp_path, clock, METERD_WEBHOOK_JOURNAL_WAIT_MS="50"
    )
    (script,) = await _scripts(client, 1)
    intake = client.app[SERVICES].intake
    held = HeldWrites(database)
    taken = asyncio.ensure_future(post_twilio(client, "/twilio/conference", script.events[0]))
    await held.entered.wait()
    queued = await post_twilio(client, "/twilio/conference", script.events[1])
    assert queued.status == 204 and (await taken).status == 204  # both from the journal
    assert intake.journal_entries == 2
    assert await _stored(database) == []
    held.release.set()  # the one the writer held commits; the withdrawn one is never written
    await intake.wait_for_late_offers()
    await intake.writer.drained()
    assert await _stored(database) == [_key(script.events[0])]
    assert await intake.replay() == 2
    assert await _stored(database) == sorted(_key(p) for p in script.events[:2])
    assert intake.journal_entries == 0
