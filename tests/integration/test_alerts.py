"""Alerts to the desk (issue 16, acceptance 4), in-process on both backends with a receiver of
our own: a balance crossing below its threshold is told once per crossing, signed; a receiver
that fails twice gets the alert on the third attempt; a restarted meterd sends nothing twice;
two meterd watching at once tell a crossing once."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import pytest
from aiohttp import web

from meterd.web.app import SERVICES

from .test_metering import START, account, deliver, finish, run_until, start_call
from .twilio_app import ManualClock, admin, agents, build_app

ALERTS_SECRET = "alerts-secret-0123456789abcdef"


class Receiver:
    """The desk's end: records every POST; answers 500 to the first `failures` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=500)
        return web.Response(status=204)

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
async def receiver(aiohttp_server):
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = await aiohttp_server(app)
    receiver.url = str(server.make_url("/hook"))
    return receiver


@pytest.fixture
def clock():
    return ManualClock(START)


def _app(database, tmp_path, clock, receiver):
    return build_app(
        database,
        tmp_path,
        clock,
        METERD_SETTLE_DELAY_SECONDS="60",
        METERD_ALERTS_URL=receiver.url,
        METERD_ALERTS_SECRET=ALERTS_SECRET,
    )


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock, receiver):
    return await aiohttp_client(_app(database, tmp_path, clock, receiver))


def alerts(client):
    return client.app[SERVICES].alerts


def _verified(headers: dict[str, str], body: bytes) -> bool:
    stamp, _, mac = headers["Meterd-Signature"].partition(",v1=")
    timestamp = stamp.removeprefix("t=")
    expected = hmac.new(ALERTS_SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(mac, expected.hexdigest())


async def _use_minutes(client, clock, n: int, talk_seconds: int) -> None:
    script = await start_call(client, n)
    start = clock.now
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", talk_seconds)
    script.end(talk_seconds)
    await deliver(client, script.events + script.status_events)
    await finish(client, clock, script, int((start - START).total_seconds()) + talk_seconds)


async def test_a_crossing_below_is_told_once_signed_and_again_after_coming_back(
    client, clock, receiver
):
    await account(client)  # 45 banked minutes (the licence's), threshold 10 by default
    assert await alerts(client).watch_balances() == 0  # first look: above, nothing told
    await admin(client, "PATCH", "/admin/accounts/acme", {"alert_bank_minutes_below": 43})
    await _use_minutes(client, clock, 1, 150)  # 3 minutes: 42 left, below 43
    assert await alerts(client).watch_balances() == 1
    assert await alerts(client).watch_balances() == 0  # the same crossing: told once
    assert await alerts(client).deliver() == 1
    ((headers, body),) = receiver.received
    assert _verified(headers, body)
    event = json.loads(body)
    assert event["type"] == "balance.bank_low" and headers["Meterd-Event-Id"] == event["id"]
    assert event["data"] == {"balance": 42, "threshold": 43}
    assert event["account_id"] == "acme"

    grant = {"minutes": 5, "reference": "top-up"}
    await admin(client, "POST", "/admin/accounts/acme/minutes", grant)  # 47: above again
    assert await alerts(client).watch_balances() == 0
    await _use_minutes(client, clock, 2, 300)  # 5 minutes: 42, a new crossing
    assert await alerts(client).watch_balances() == 1
    assert await alerts(client).deliver() == 1
    assert [e["type"] for e in receiver.events()] == ["balance.bank_low"] * 2
    assert len({e["id"] for e in receiver.events()}) == 2


async def test_a_receiver_that_fails_twice_gets_the_alert_on_the_third_attempt(
    client, clock, receiver
):
    receiver.failures = 2
    await account(client)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await run_until(client, clock, 70)
    body = {"call_sid": script.call_sid, "agent_id": "alice", "reason": "software_defect"}
    assert (await agents(client, "/agents/waiver", body)).status == 200
    assert await alerts(client).deliver() == 0  # 1st attempt: 500
    assert await alerts(client).deliver() == 0  # not due yet: no second POST
    assert len(receiver.received) == 1
    clock.advance(5)
    assert await alerts(client).deliver() == 0  # 2nd attempt, 5 s later: 500
    clock.advance(30)
    assert await alerts(client).deliver() == 1  # 3rd, 30 s later: delivered
    assert len(receiver.received) == 3
    ids = {headers["Meterd-Event-Id"] for headers, _ in receiver.received}
    assert ids == {f"call.waived:{script.call_sid}"}
    event = receiver.events()[-1]
    assert event["data"]["reason"] == "software_defect" and event["data"]["charges_reversed"] == 2


async def test_a_restarted_meterd_sends_nothing_twice(
    aiohttp_client, database, tmp_path, clock, receiver
):
    first = await aiohttp_client(_app(database, tmp_path, clock, receiver))
    await account(first)
    await admin(first, "PATCH", "/admin/accounts/acme", {"alert_bank_minutes_below": 50})
    await alerts(first).watch_balances()  # first look: 45 < 50, below already: nothing told
    assert await alerts(first).deliver() == 0
    await admin(first, "PATCH", "/admin/accounts/acme", {"alert_bank_minutes_below": 44})
    assert await alerts(first).watch_balances() == 0  # 45 >= 44: back above
    await _use_minutes(first, clock, 1, 60)  # 44 left: not below 44
    await _use_minutes(first, clock, 2, 60)  # 43: below
    assert await alerts(first).watch_balances() == 1
    assert await alerts(first).deliver() == 1
    await first.close()
    again = await aiohttp_client(_app(database, tmp_path, clock, receiver))
    clock.advance(3600)
    assert await alerts(again).watch_balances() == 0
    assert await alerts(again).deliver() == 0
    assert len(receiver.received) == 1


async def test_two_meterd_watching_at_once_tell_a_crossing_once(
    aiohttp_client, database, tmp_path, clock, receiver
):
    one = await aiohttp_client(_app(database, tmp_path, clock, receiver))
    two = await aiohttp_client(_app(database, tmp_path / "two", clock, receiver))
    await account(one)
    await alerts(one).watch_balances()
    await admin(one, "PATCH", "/admin/accounts/acme", {"alert_bank_minutes_below": 46})
    told = await asyncio.gather(*(alerts(c).watch_balances() for c in (one, two, one, two)))
    assert sum(told) == 1
    assert sum(await asyncio.gather(alerts(one).deliver(), alerts(two).deliver())) == 1
    assert len(receiver.received) == 1


async def test_a_threshold_must_be_a_whole_number_or_null(client):
    await account(client)
    for bad in (-1, 1.5, "10", True):
        response = await admin(
            client, "PATCH", "/admin/accounts/acme", {"alert_deposit_minor_below": bad}
        )
        assert response.status == 400
    response = await admin(
        client, "PATCH", "/admin/accounts/acme", {"alert_bank_minutes_below": None}
    )
    assert response.status == 200
    assert (await response.json())["alert_bank_minutes_below"] is None


async def test_with_no_url_nothing_is_recorded(aiohttp_client, database, tmp_path, clock):
    client = await aiohttp_client(build_app(database, tmp_path, clock))
    assert not alerts(client).enabled
    assert await alerts(client).watch_balances() == 0
    assert await alerts(client).deliver() == 0
