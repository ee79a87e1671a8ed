"""Auto top-up (issue 16, acceptance 5), through the real `stripe` SDK against localstripe, on
both backends: an account whose banked minutes fall below its threshold has one block bought on
its card on file, also with two calls metering at once and two meterd looking; never while a
decline is unresolved, at most `auto_top_up_per_day` in 24 hours, outside calls too."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import update

from meterd.core import ledger
from meterd.store import ledger_store, payments_store
from meterd.store.payments_store import PaymentKind, PaymentStatus
from meterd.store.schema import payment_operations
from meterd.web.app import SERVICES
from tests.call_scripts import CallScript

from .test_metering import START, balances, deliver
from .test_payments import account, make_client, pay_params
from .twilio_app import admin, post_twilio


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, localstripe):
    localstripe.reset()
    client = await make_client(aiohttp_client, database, tmp_path, localstripe.base_url)
    yield client
    await client.gateway.close()


async def _blocks(client) -> list[str]:
    """The account's blocks bought, by key."""
    async with client.app[SERVICES].database.read() as connection:
        listed = await ledger_store.account_transactions(
            connection, "acme", frozenset({ledger.TransactionKind.CARD_BLOCK})
        )
    return [t.key for t in listed]


async def _auto(client, threshold: int) -> None:
    body = {"auto_top_up_below_minutes": threshold}
    assert (await admin(client, "PATCH", "/admin/accounts/acme", body)).status == 200


async def test_two_calls_at_once_and_two_meterd_looking_buy_one_block(client):
    await account(client)
    services = client.app[SERVICES]
    first = CallScript(1, START)
    await post_twilio(client, "/twilio/voice", first.voice())  # no funds: <Pay>
    twiml = await (
        await post_twilio(client, "/twilio/pay?attempt=1", pay_params(first.call_sid))
    ).text()
    assert "<Conference" in twiml and await balances(client) == (30, 0)  # the gate's block
    second = CallScript(2, START)
    assert (
        "<Conference" in await (await post_twilio(client, "/twilio/voice", second.voice())).text()
    )
    await _auto(client, 29)
    for script in (first, second):
        script.join("customer", 0).join("agent:alice", 0).join("agent:bob", 0)
        await deliver(client, script.events)
    client.clock.advance(1)
    await services.metering.tick()  # 2 calls x 2 agents: minute 1 each, bank 26 < 29
    assert (await balances(client))[0] == 26
    # two meterd's auto top-up jobs and the tick, all at once: one block is queued
    queued = await asyncio.gather(
        services.auto_top_up.run(), services.auto_top_up.run(), services.metering.tick()
    )
    assert queued[0] + queued[1] == 1
    assert await services.payments.send_queued() == 1
    assert await balances(client) == (56, 0)
    assert len(await _blocks(client)) == 2  # the gate's and one auto top-up
    assert await services.auto_top_up.run() == 0  # 56 >= 29: nothing more


async def test_outside_calls_and_at_most_the_daily_limit(client):
    await account(client)
    services = client.app[SERVICES]
    assert (await services.payments.save_card("acme", "pm_card_visa")).ok
    await _auto(client, 5)  # bank 0 < 5, no call anywhere
    for _ in range(3):  # the daily limit (3 by default): each lands, bank 30, 60, 90
        await _auto(client, (await balances(client))[0] + 1)
        assert await services.auto_top_up.run() == 1
        assert await services.payments.send_queued() == 1
    await _auto(client, (await balances(client))[0] + 1)
    assert await services.auto_top_up.run() == 0  # a 4th within 24 hours: no
    client.clock.advance(24 * 3600)
    assert await services.auto_top_up.run() == 1  # a day later: yes
    assert await services.payments.send_queued() == 1
    assert await balances(client) == (120, 0)


async def _purchase(client, key: str, status: str) -> None:
    """A call's block, completed with `status` (a decline, or a card that paid again)."""
    async with client.app[SERVICES].database.write() as connection:
        await payments_store.insert_operation(
            connection,
            key=key,
            kind=PaymentKind.CHARGE,
            account_id="acme",
            call_sid=None,
            amount_minor=3000,
            currency="USD",
            minutes=30,
            related_key=None,
            status=PaymentStatus(status),
            created_at=client.clock.now,
        )
        await connection.execute(
            update(payment_operations)
            .where(payment_operations.c.operation_key == key)
            .values(completed_at=client.clock.now)
        )


async def test_never_while_a_decline_is_unresolved(client):
    await account(client)
    services = client.app[SERVICES]
    assert (await services.payments.save_card("acme", "pm_card_visa")).ok
    await _purchase(client, "call:CAdeclined:block:1", "failed")
    await _auto(client, 5)
    assert await services.auto_top_up.run() == 0  # meterd never retries a declined card itself
    client.clock.advance(60)
    await _purchase(client, "call:CApaid:block:1", "succeeded")  # the card paid again
    assert await services.auto_top_up.run() == 1


async def test_off_without_a_threshold(client):
    await account(client)
    services = client.app[SERVICES]
    assert (await services.payments.save_card("acme", "pm_card_visa")).ok
    assert await services.auto_top_up.run() == 0
    await _auto(client, 0)
    assert await services.auto_top_up.run() == 0


async def test_a_block_bought_by_auto_top_up_during_a_call_keeps_the_deposit(client):
    """Settlement moves banked minutes onto the deposit when meterd bought a block for a call
    while the deposit could still pay (bank first, then deposit, then card). A block the
    customer asked for by auto top-up is not such a block: its minutes stay banked."""
    await account(client)
    services = client.app[SERVICES]
    assert (await services.payments.save_card("acme", "pm_card_visa")).ok
    await admin(client, "POST", "/admin/accounts/acme/minutes", {"minutes": 4, "reference": "g"})
    body = {"amount_minor": 500, "reference": "d1"}
    await admin(client, "POST", "/admin/accounts/acme/deposits", body)
    await _auto(client, 2)
    script = CallScript(1, START)
    assert (
        "<Conference" in await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    )
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    while client.clock.now < START + dt.timedelta(seconds=130):
        client.clock.advance(1)
        await services.metering.tick()  # minutes 1-3 from the bank: 1 left, below 2
    assert await services.auto_top_up.run() == 1
    await services.payments.send_queued()
    assert await balances(client) == (31, 500)
    script.leave("agent:alice", 350).end(350)
    await deliver(client, script.events[-4:] + script.status_events)
    client.clock.now = START + dt.timedelta(seconds=350 + 61)
    await services.metering.tick()  # settled: 6 minutes, all banked
    assert await balances(client) == (28, 500)
