"""Running out mid-call: what meterd asks of Twilio (asserted on a recording server standing in
for Twilio's REST API), when, and that every minute is still written."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from meterd.services.ledger_check import check_ledger
from meterd.store.schema import outbox
from meterd.web.app import SERVICES
from tests.recording_server import RecordingTwilio
from tests.twilio_payloads import ACCOUNT_SID

from .test_metering import START, account, balances, call_view, deliver, start_call
from .twilio_app import ManualClock, admin, build_app, recorded_rest


@pytest.fixture
async def twilio():
    async with RecordingTwilio() as server:
        yield server


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, twilio):
    rest = recorded_rest(twilio)
    clock = ManualClock(START)
    app = build_app(
        database,
        tmp_path,
        clock,
        twilio_rest=rest,
        METERD_SETTLE_DELAY_SECONDS="60",
        METERD_WARN_MINUTES_LEFT="2",
        METERD_GRACE_SECONDS="60",
    )
    client = await aiohttp_client(app)
    client.clock = clock
    yield client
    await rest.close()


async def tick_until(client, offset_seconds: int) -> None:
    services = client.app[SERVICES]
    while client.clock.now < START + dt.timedelta(seconds=offset_seconds):
        client.clock.advance(1)
        await services.metering.tick()
        await services.outbox.dispatch()


async def outbox_created(database) -> dict[str, int]:
    async with database.read() as connection:
        rows = await connection.execute(select(outbox.c.request_key, outbox.c.created_at))
        return {
            row.request_key.rsplit(":", 1)[-1]: int((row.created_at - START).total_seconds())
            for row in rows
        }


async def test_announce_then_hang_up_and_every_minute_is_still_written(client, twilio, database):
    await account(client, products=[])
    await admin(client, "POST", "/admin/accounts/acme/minutes", {"minutes": 3, "reference": "b"})
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await tick_until(client, 200)

    # minute 1 at 0 s leaves 2 minutes: the warning (warn_minutes_left = 2);
    # minute 3 at 120 s leaves none: the "no minutes left" announcement;
    # grace_seconds = 60 later, at 180 s, the call is ended
    assert await outbox_created(database) == {"warn": 1, "exhausted": 120, "hang_up": 180}
    requests = twilio.requests
    assert [r.path for r in requests] == [
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Conferences/{script.conference_sid}.json",
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Conferences/{script.conference_sid}.json",
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{script.call_sid}.json",
    ]
    assert requests[0].form_dict["AnnounceUrl"].endswith("/twilio/announcement?message=warn")
    assert requests[1].form_dict["AnnounceUrl"].endswith("/twilio/announcement?message=exhausted")
    assert requests[2].form_dict["Status"] == "completed"

    # Twilio ends the call at 185 s; 4 minutes were used: 3 from the bank, 1 owed (1.00)
    script.leave("agent:alice", 185).end(185)
    await deliver(client, script.events[3:] + script.status_events)
    client.clock.now = START + dt.timedelta(seconds=300)
    await client.app[SERVICES].metering.tick()
    view = await call_view(client, script)
    assert view["settled_at"] is not None
    assert view["charges"]["bank_minutes"] == 3 and view["charges"]["owed_minor"] == 100
    assert await balances(client) == (0, 0)
    assert (await check_ledger(database)).ok


async def test_a_failing_twilio_is_retried_a_bounded_number_of_times_and_metering_goes_on(
    client, twilio, database
):
    await account(client, products=[])
    await admin(client, "POST", "/admin/accounts/acme/minutes", {"minutes": 1, "reference": "b"})
    twilio.fail_next(100, status=500)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await tick_until(client, 90)
    # the one banked minute is gone at once: no warning, the "no minutes left" announcement,
    # and at 61 s the hang-up; the adapter tried 3 times for each, then gave up; minutes went
    # on being posted
    assert len(twilio.requests) == 3 * 2
    async with database.read() as connection:
        failed = (await connection.execute(select(outbox.c.failed_at))).all()
    assert all(row.failed_at is not None for row in failed)
    view = await call_view(client, script)
    assert view["charges"]["bank_minutes"] == 1 and view["charges"]["owed_minor"] == 100


async def test_allow_debt_goes_on_and_flags_the_account(aiohttp_client, database, tmp_path):
    clock = ManualClock(START)
    client = await aiohttp_client(
        build_app(
            database,
            tmp_path,
            clock,
            METERD_ON_EXHAUSTED="allow_debt",
            METERD_SETTLE_DELAY_SECONDS="60",
        )
    )
    await account(client, products=[], deposit_minor=150)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 180).end(180)
    await deliver(client, script.events + script.status_events)
    clock.now = START + dt.timedelta(seconds=300)
    await client.app[SERVICES].metering.tick()
    # 3 minutes x 100 = 300 from a deposit of 150: it goes to -150 and the account is flagged
    assert await balances(client) == (0, -150)
    view = await (await admin(client, "GET", "/admin/accounts/acme")).json()
    assert view["debt_flagged"] is True
    assert (await check_ledger(database)).ok
