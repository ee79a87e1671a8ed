"""Payment before connecting, and cards mid-call, through the real `stripe` SDK against
localstripe, on SQLite and PostgreSQL. Block price 3000 (30.00) for 30 minutes; rate 100."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import stripe
from aiohttp import web

from meterd.adapters.stripe_gateway import StripeGateway, StripeSettings
from meterd.services.ledger_check import check_ledger
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.stripe_server import SECRET_KEY, LocalStripe
from tests.twilio_payloads import voice_params

from .test_metering import START, balances, call_view, deliver
from .twilio_app import ManualClock, admin, agents, build_app, post_twilio


@pytest.fixture(scope="module")
def localstripe():
    server = LocalStripe().start()
    yield server
    server.stop()


def pay_params(
    call_sid: str, result: str = "success", token: str = "pm_card_visa", **extra: str
) -> dict[str, str]:
    params = voice_params(
        call_sid, CUSTOMER_NUMBER, Result=result, PaymentMethod="credit-card", **extra
    )
    if result == "success":
        params |= {
            "PaymentToken": token,
            "PaymentCardNumber": "xxxx-xxxx-xxxx-4242",
            "PaymentCardType": "visa",
            "ExpirationDate": "1230",
            "SecurityCode": "***",
            "ProfileId": "",
        }
    return params


async def make_client(aiohttp_client, database, tmp_path, base_url, *, timeout=8, **env):
    gateway = StripeGateway(
        StripeSettings(secret_key=SECRET_KEY, api_base_url=base_url, timeout_seconds=timeout)
    )
    clock = ManualClock(START)
    client = await aiohttp_client(
        build_app(
            database, tmp_path, clock, gateway=gateway, METERD_SETTLE_DELAY_SECONDS="60", **env
        )
    )
    client.clock = clock
    client.gateway = gateway
    return client


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, localstripe):
    localstripe.reset()
    client = await make_client(aiohttp_client, database, tmp_path, localstripe.base_url)
    yield client
    await client.gateway.close()


async def account(client, **fields):
    body = {
        "account_id": "acme",
        "name": "Acme",
        "plan": "per_minute",
        "caller_ids": [CUSTOMER_NUMBER],
        **fields,
    }
    assert (await admin(client, "POST", "/admin/accounts", body)).status == 201


async def intents(localstripe, call_sid: str) -> list:
    client = stripe.StripeClient(
        SECRET_KEY,
        base_addresses={"api": localstripe.base_url},
        http_client=stripe.AIOHTTPClient(),
        max_network_retries=0,
    )
    try:
        page = await client.v1.payment_intents.list_async({"limit": 100})
        return [
            i
            for i in page.data
            if (i.metadata.to_dict() if i.metadata else {})
            .get("operation_key", "")
            .startswith(f"call:{call_sid}:" if call_sid else "")
        ]
    finally:
        await client._requestor._client.close_async()


async def ring(client, n=1) -> tuple[CallScript, str]:
    script = CallScript(n, START)
    return script, await (await post_twilio(client, "/twilio/voice", script.voice())).text()


# --- the gate ------------------------------------------------------------------------------


async def test_a_caller_with_no_funds_and_no_card_is_asked_for_one(client):
    await account(client)
    _, twiml = await ring(client)
    assert "<Pay" in twiml and 'tokenType="payment-method"' in twiml
    assert "/meterd/twilio/pay?attempt=1" in twiml and "/meterd/twilio/pay-status" in twiml
    assert "<Conference" not in twiml


async def test_a_good_card_is_charged_once_for_a_block_and_the_caller_connected(
    client, localstripe, database
):
    await account(client)
    script, _ = await ring(client)
    twiml = await (
        await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
    ).text()
    assert f">{script.call_sid}</Conference>" in twiml
    assert await balances(client) == (30, 0)  # one block: 30 minutes for 30.00
    view = await (await admin(client, "GET", "/admin/accounts/acme")).json()
    assert view["card_on_file"] is True
    charged = await intents(localstripe, script.call_sid)
    assert [(i.amount, i.status) for i in charged] == [(3000, "succeeded")]
    assert (await check_ledger(database)).ok


async def test_a_declined_card_never_connects(client, localstripe):
    await account(client)
    script, _ = await ring(client)
    twiml = await (
        await post_twilio(
            client,
            "/twilio/pay?attempt=1",
            pay_params(script.call_sid, token="pm_card_visa_chargeDeclined"),
        )
    ).text()
    assert "declined" in twiml and "<Pay" in twiml and "attempt=2" in twiml
    assert "<Conference" not in twiml
    assert await balances(client) == (0, 0)
    assert await intents(localstripe, script.call_sid) == []


@pytest.mark.parametrize(
    ("result", "says"),
    [
        ("too-many-failed-attempts", "could not read that card"),
        ("payment-connector-error", "could not reach our payment service"),
        ("caller-interrupted-with-star", "card entry was cancelled"),
        ("validation-error", "could not read that card"),
        ("internal-error", "could not reach our payment service"),
    ],
)
async def test_each_pay_result_gets_its_message_and_nothing_is_charged(
    client, localstripe, result, says
):
    await account(client)
    script, _ = await ring(client)
    twiml = await (
        await post_twilio(
            client, "/twilio/pay?attempt=1", pay_params(script.call_sid, result=result)
        )
    ).text()
    assert says in twiml and "<Pay" in twiml and "<Conference" not in twiml
    assert await intents(localstripe, script.call_sid) == []
    assert await balances(client) == (0, 0)


async def test_the_caller_hanging_up_during_pay_ends_it(client):
    await account(client)
    script, _ = await ring(client)
    twiml = await (
        await post_twilio(
            client, "/twilio/pay?attempt=1", pay_params(script.call_sid, result="caller-hung-up")
        )
    ).text()
    assert "<Hangup" in twiml and "<Pay" not in twiml
    assert (await call_view(client, script))["status"] == "rejected"


async def test_after_the_last_attempt_a_polite_goodbye(client):
    await account(client)
    script, _ = await ring(client)
    for attempt in (1, 2):
        await post_twilio(
            client,
            f"/twilio/pay?attempt={attempt}",
            pay_params(script.call_sid, result="caller-interrupted-with-star"),
        )
    twiml = await (
        await post_twilio(
            client,
            "/twilio/pay?attempt=3",
            pay_params(script.call_sid, token="pm_card_visa_chargeDeclined"),
        )
    ).text()
    assert "Goodbye" in twiml and "<Hangup" in twiml and "<Pay" not in twiml


async def test_a_card_on_file_is_charged_without_asking(client, localstripe):
    await account(client)
    first, _ = await ring(client, 1)
    await post_twilio(client, "/twilio/pay?attempt=1", pay_params(first.call_sid))
    await admin(client, "POST", "/admin/accounts/acme/minutes", {"minutes": 1, "reference": "x"})
    # spend everything: drop the bank to zero by a big call is long; grant and use instead
    services = client.app[SERVICES]
    async with services.database.write() as connection:
        from meterd.core import ledger
        from meterd.store import ledger_store

        await ledger_store.post(
            connection,
            ledger.transfer(
                "test:spend",
                "minutes_used",
                unit=ledger.MINUTES,
                amount=31,
                from_book=ledger.bank_book("acme"),
                to_book=ledger.MINUTES_USED,
                account_id="acme",
            ),
            START,
        )
    second, twiml = await ring(client, 2)
    assert f">{second.call_sid}</Conference>" in twiml
    assert len(await intents(localstripe, second.call_sid)) == 1


async def test_gateway_down_never_connects(aiohttp_client, database, tmp_path):
    down = LocalStripe()  # never started: nothing listens there
    client = await make_client(aiohttp_client, database, tmp_path, down.base_url)
    try:
        await account(client)
        script, _ = await ring(client)
        twiml = await (
            await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
        ).text()
        assert "could not reach our payment service" in twiml and "<Conference" not in twiml
    finally:
        await client.gateway.close()


async def test_gateway_slow_past_the_timeout_never_connects(aiohttp_client, database, tmp_path):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = await make_client(
        aiohttp_client, database, tmp_path, f"http://127.0.0.1:{port}", timeout=1
    )
    try:
        await account(client)
        script, _ = await ring(client)
        twiml = await (
            await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
        ).text()
        assert "could not reach our payment service" in twiml and "<Conference" not in twiml
    finally:
        await client.gateway.close()
        await runner.cleanup()


# --- mid-call, settlement, waivers ----------------------------------------------------------


async def run_call(client, script, billable_seconds: int) -> None:
    services = client.app[SERVICES]
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    while client.clock.now < START + dt.timedelta(seconds=billable_seconds):
        client.clock.advance(20)
        await services.metering.tick()
        await services.payments.run()
    script.leave("agent:alice", billable_seconds).end(billable_seconds)
    await deliver(client, script.events[3:] + script.status_events)
    client.clock.now = START + dt.timedelta(seconds=billable_seconds + 61)
    await services.metering.tick()
    await services.payments.run()
    assert (await call_view(client, script))["settled_at"] is not None


async def test_block_mode_buys_exactly_one_more_block_for_a_50_minute_call(
    client, localstripe, database
):
    await account(client)
    script, _ = await ring(client)
    await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
    await run_call(client, script, 3000)
    # 50 agent-minutes: the first block (30) at the gate, one more block when it ran out;
    # 60 bought - 50 used = 10 left in the bank
    charged = await intents(localstripe, script.call_sid)
    assert sorted(i.amount for i in charged) == [3000, 3000]
    assert await balances(client) == (10, 0)
    view = await call_view(client, script)
    assert view["charges"]["bank_minutes"] == 50 and view["charges"]["card_minor"] == 6000
    assert (await check_ledger(database)).ok


async def test_authorize_mode_captures_what_was_used_and_releases_the_rest(
    aiohttp_client, database, tmp_path, localstripe
):
    localstripe.reset()
    client = await make_client(
        aiohttp_client,
        database,
        tmp_path,
        localstripe.base_url,
        METERD_CARD_MODE="authorize",
        METERD_AUTHORIZE_MINUTES="30",
    )
    try:
        await account(client)
        script, _ = await ring(client)
        twiml = await (
            await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
        ).text()
        assert "<Conference" in twiml
        await run_call(client, script, 720)
        # 12 agent-minutes x 100 = 1200 captured of the 3000 authorised; the rest released
        charged = await intents(localstripe, script.call_sid)
        assert len(charged) == 1 and charged[0].status == "succeeded"
        assert charged[0].amount == 3000
        assert charged[0].latest_charge.amount_refunded == 3000 - 1200
        view = await call_view(client, script)
        assert view["charges"]["card_minor"] == 1200
        assert await balances(client) == (0, 0)
        assert (await check_ledger(database)).ok
    finally:
        await client.gateway.close()


async def test_a_waiver_after_a_card_charge_refunds_it_once(client, localstripe, database):
    await account(client)
    script, _ = await ring(client)
    await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
    await run_call(client, script, 600)  # 10 minutes of the 30 bought
    body = {"call_sid": script.call_sid, "agent_id": "alice", "reason": "software_defect"}
    for _ in range(2):
        assert (await agents(client, "/agents/waiver", body)).status == 200
        await client.app[SERVICES].payments.run()
    # the 10 minutes come back, then the whole block (30 unused) is refunded: bank 0
    charged = await intents(localstripe, script.call_sid)
    assert len(charged) == 1 and charged[0].latest_charge.amount_refunded == 3000
    assert await balances(client) == (0, 0)
    assert (await check_ledger(database)).ok


async def test_a_payment_left_in_flight_is_resolved_once(client, localstripe, database):
    """The crash window in-process: the operation is recorded and reached Stripe, but its
    answer was lost. Resolution finds it by its key and completes it exactly once."""
    await account(client)
    script, _ = await ring(client)
    services = client.app[SERVICES]
    await services.payments.save_card("acme", "pm_card_visa")
    async with services.database.write() as connection:
        from sqlalchemy import select

        from meterd.store.schema import accounts as accounts_table

        row = (
            await connection.execute(
                select(accounts_table).where(accounts_table.c.account_id == "acme")
            )
        ).one()
        key = await services.payments._record(connection, row, script.call_sid, status="sent")
    from meterd.services.payments import card_of

    await client.gateway.charge(key, card_of(row), 3000, "USD")  # its answer is "lost"
    assert await balances(client) == (0, 0)
    client.clock.advance(30)
    assert await services.payments.resolve_sent() == 0  # too early: may still be in flight
    client.clock.advance(61)
    assert await services.payments.resolve_sent() == 1
    assert await services.payments.resolve_sent() == 0
    assert await balances(client) == (30, 0)
    assert len(await intents(localstripe, script.call_sid)) == 1
    assert (await check_ledger(database)).ok


async def test_an_incident_the_deposit_cannot_pay_goes_to_the_card_on_file(
    client, localstripe, database
):
    await account(client, plan="per_incident")
    services = client.app[SERVICES]
    assert (await services.payments.save_card("acme", "pm_card_visa")).ok
    script, twiml = await ring(client)
    assert "<Conference" in twiml  # per incident: nothing to pay before connecting
    await run_call(client, script, 600)
    # one incident, 5000, from the card; the deposit is untouched
    charged = await intents(localstripe, "")
    assert [
        i.amount for i in charged if i.metadata.to_dict()["operation_key"].startswith("incident:")
    ] == [5000]
    view = await call_view(client, script)
    assert view["charges"]["incidents"] == 1 and view["charges"]["card_minor"] == 5000
    assert view["charges"]["owed_minor"] == 0
    assert (await check_ledger(database)).ok
