"""The webhook journal (issue 12, finding 1): while the database cannot take a conference or
call-status callback, meterd writes it to its local journal and answers 204; the journal is
applied in order, once, when the database is back; nothing answered 2xx is lost.

The database is made unavailable the way a busy SQLite file is: another process holds its write
lock (meterd's busy timeout is 50 ms). PostgreSQL cut off for 20 s, and a kill -9 with entries in
the journal, are in tests/e2e/test_webhook_journal_daemon.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sqlite3

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from meterd.store.database import open_database
from meterd.store.journal import JournalMisused, WebhookJournal
from meterd.store.schema import calls, webhook_events
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript

from .twilio_app import ManualClock, admin, build_app, post_twilio

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)


@contextlib.contextmanager
def write_lock_held(path):
    """Another process's writer holds the SQLite file's write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def _app(aiohttp_client, tmp_path, **env):
    path = tmp_path / "meterd.sqlite3"
    database = await open_database(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=50)
    clock = ManualClock(START)
    app = build_app(database, tmp_path, clock, **env)
    client = await aiohttp_client(app)
    response = await admin(
        client,
        "POST",
        "/admin/accounts",
        {
            "account_id": "acme",
            "name": "Acme",
            "plan": "service_agreement",
            "caller_ids": [CUSTOMER_NUMBER],
        },
    )
    assert response.status == 201
    return client, database, path, clock


async def _events(database, call_sid: str) -> list[tuple[int, str]]:
    async with database.read() as connection:
        rows = await connection.execute(
            select(webhook_events.c.sequence_number, webhook_events.c.kind)
            .where(webhook_events.c.call_sid == call_sid, webhook_events.c.route != "voice")
            .order_by(webhook_events.c.event_id)
        )
        return [(row[0], row[1]) for row in rows]


async def _call(database, call_sid: str):
    async with database.read() as connection:
        return (await connection.execute(select(calls).where(calls.c.call_sid == call_sid))).one()


def _script(n: int = 1) -> CallScript:
    script = CallScript(n, START)
    script.join("customer", 0).join("agent:alice", 10).hold("customer", 70)
    script.unhold("customer", 100).leave("agent:alice", 200).end(205)
    script.status_events.clear()
    return script


async def test_callbacks_during_an_outage_are_journaled_answered_204_and_applied_once_in_order(
    aiohttp_client, tmp_path
):
    client, database, path, clock = await _app(aiohttp_client, tmp_path)
    try:
        script = _script()
        response = await post_twilio(client, "/twilio/voice", script.voice())
        assert "<Conference" in await response.text()
        first, *during = script.events
        assert (await post_twilio(client, "/twilio/conference", first)).status == 204
        intake = client.app[SERVICES].intake
        with capture_logs() as logs, write_lock_held(path):
            for params in during:
                clock.advance(1)
                assert (await post_twilio(client, "/twilio/conference", params)).status == 204
            healthz = await client.get("/healthz")
            assert healthz.status == 200
            assert await healthz.json() == {
                "status": "degraded",
                "reason": "journaling: database unavailable",
                "database": "unavailable",
                "journal_entries": len(during),
            }
            assert await intake.replay() == 0  # still locked: nothing applied, nothing lost
            # the caller of a new call hears an apology, not Twilio's error
            voice = await post_twilio(client, "/twilio/voice", _script(2).voice())
            assert voice.status == 200 and "cannot take your call" in await voice.text()
        assert await _events(database, script.call_sid) == [(0, "conference-start")]
        assert intake.journal_entries == len(during)
        # a newer callback must not overtake the journaled ones: it joins the journal
        again = await post_twilio(client, "/twilio/conference", during[-1])
        assert again.status == 204 and intake.journal_entries == len(during) + 1
        assert await intake.replay() == len(during) + 1
        assert intake.journal_entries == 0
        assert await _events(database, script.call_sid) == [
            (n, params["StatusCallbackEvent"]) for n, params in enumerate(script.events)
        ]
        call = await _call(database, script.call_sid)
        assert call.ended_at == script.at(205) and call.end_reason == "conference-end"
        assert (tmp_path / "webhook-journal.log").stat().st_size == 0
        assert await intake.replay() == 0
        assert (await (await client.get("/healthz")).json())["status"] == "ok"
        reasons = [
            entry["reason"] for entry in logs if entry["event"].startswith("journaling webhooks")
        ]
        assert reasons == ["outage"]  # one line when journaling begins
    finally:
        await database.close()


async def test_a_call_status_without_timestamp_ends_the_call_when_meterd_took_it(
    aiohttp_client, tmp_path
):
    """A completed status with no Timestamp happened when it arrived, not when the journal was
    applied: the outage's length must not be billed."""
    client, database, path, clock = await _app(aiohttp_client, tmp_path)
    try:
        script = _script()
        await post_twilio(client, "/twilio/voice", script.voice())
        status = {
            "CallSid": script.call_sid,
            "AccountSid": script.voice()["AccountSid"],
            "CallStatus": "completed",
            "CallDuration": "205",
        }
        clock.advance(205)
        with write_lock_held(path):
            assert (await post_twilio(client, "/twilio/call-status", status)).status == 204
        taken_at = clock()
        clock.advance(3600)
        assert await client.app[SERVICES].intake.replay() == 1
        call = await _call(database, script.call_sid)
        assert call.ended_at == taken_at
    finally:
        await database.close()


async def test_a_slow_database_is_journaled_after_the_wait_and_the_late_write_counts_once(
    aiohttp_client, tmp_path
):
    client, database, path, _clock = await _app(
        aiohttp_client, tmp_path, METERD_WEBHOOK_JOURNAL_WAIT_MS="100"
    )
    try:
        database_slow = await open_database(
            f"sqlite+aiosqlite:///{path}", busy_timeout_ms=3000, upgrade=False
        )
        client.app[SERVICES].intake._ingest._database = database_slow  # waits, does not fail
        script = _script()
        await post_twilio(client, "/twilio/voice", script.voice())
        with write_lock_held(path):
            for params in script.events[:2]:
                assert (await post_twilio(client, "/twilio/conference", params)).status == 204
            intake = client.app[SERVICES].intake
            assert intake.journal_entries == 2
        await intake.wait_for_late_offers()
        assert await intake.replay() == 2
        assert await _events(database, script.call_sid) == [
            (0, "conference-start"),
            (1, "participant-join"),
        ]
        await database_slow.close()
    finally:
        await database.close()


async def test_a_journaled_callback_the_database_refuses_is_dropped_with_a_warning(
    aiohttp_client, tmp_path
):
    client, database, _path, _clock = await _app(aiohttp_client, tmp_path)
    try:
        unknown = _script(9)  # its voice webhook never came: no such call
        # journaled while the database could not even be read (so the call was not looked up)
        intake = client.app[SERVICES].intake
        await intake._journal.append("conference", list(unknown.events[0].items()), START)
        with capture_logs() as logs:
            assert await client.app[SERVICES].intake.replay() == 1
        (line,) = [entry for entry in logs if entry["event"].startswith("journaled webhook")]
        assert line["error"] == "not_found" and line["log_level"] == "warning"
        assert await _events(database, unknown.call_sid) == []
    finally:
        await database.close()


async def test_a_full_journal_answers_503_and_keeps_what_it_has(aiohttp_client, tmp_path):
    client, database, path, _clock = await _app(
        aiohttp_client, tmp_path, METERD_WEBHOOK_JOURNAL_BYTES_MAX=str(64 * 1024)
    )
    try:
        script = _script()
        await post_twilio(client, "/twilio/voice", script.voice())
        statuses = []
        with write_lock_held(path):
            for n in range(200):
                params = dict(script.events[0], SequenceNumber=str(n), Padding="x" * 1000)
                response = await post_twilio(client, "/twilio/conference", params)
                statuses.append(response.status)
            healthz = await client.get("/healthz")
            assert healthz.status == 503
        accepted = statuses.index(503)
        assert set(statuses[:accepted]) == {204} and set(statuses[accepted:]) == {503}
        assert await client.app[SERVICES].intake.replay() == accepted
        assert len(await _events(database, script.call_sid)) == accepted
    finally:
        await database.close()


def test_the_journal_drops_a_torn_tail_and_keeps_ids_growing(tmp_path):
    journal = WebhookJournal(tmp_path, bytes_max=10**6)

    async def fill() -> None:
        for n in range(3):
            await journal.append("conference", [("SequenceNumber", str(n))], START)
        await journal.mark_applied(journal.pending[:1])

    asyncio.run(fill())
    with (tmp_path / "webhook-journal.log").open("ab") as handle:
        handle.write(b'0badc0de {"id": 4, "rou')  # a crash mid-write: never acknowledged
    reopened = WebhookJournal(tmp_path, bytes_max=10**6)
    assert [entry.entry_id for entry in reopened.pending] == [2, 3]
    assert not (tmp_path / "webhook-journal.log").read_bytes().endswith(b"rou")

    async def drain_and_add() -> int:
        with pytest.raises(JournalMisused):  # only the oldest, in order
            await reopened.mark_applied(reopened.pending[1:])
        await reopened.mark_applied(reopened.pending)  # the two at once
        assert (tmp_path / "webhook-journal.log").stat().st_size == 0
        return (await reopened.append("call-status", [], START)).entry_id

    assert asyncio.run(drain_and_add()) == 4
    assert [entry.entry_id for entry in WebhookJournal(tmp_path, bytes_max=10**6).pending] == [4]


def test_a_damaged_entry_in_the_middle_stops_the_load_there(tmp_path):
    journal = WebhookJournal(tmp_path, bytes_max=10**6)

    async def fill() -> None:
        for n in range(3):
            await journal.append("conference", [("SequenceNumber", str(n))], START)

    asyncio.run(fill())
    path = tmp_path / "webhook-journal.log"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1].replace(b"SequenceNumber", b"SequenceNumbeR") + lines[2])
    assert [entry.entry_id for entry in WebhookJournal(tmp_path, bytes_max=10**6).pending] == [1]
