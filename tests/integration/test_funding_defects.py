"""Issue 11, defects 2 to 13: money where features meet (cards with waivers, rate changes, two
calls of one account, the connect gate, settlement racing research). Each test carries the
issue's figures; they fail until one funding authority per account decides every path.

In-process on SQLite and PostgreSQL, time driven by ManualClock, cards through the real Stripe
SDK against localstripe. Defaults: increment 60 s, rate 100, block 30 minutes for 3000,
incident 5000, included minutes 45 (a Desktop licence).

A waived call must leave the account exactly as if its charges had never been made: bank,
deposit and receivable back where they were before the call, every card charge of the call
refunded in full (blocks bought during it too, their minutes out of the bank), authorisations
released or their captures refunded, and the call's postings on card_receipts, block_revenue,
usage_revenue and incident_revenue netting to 0."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import defaultdict
from urllib.parse import urlencode

import pytest

from meterd.adapters.stripe_gateway import GatewayUnavailable, StripeGateway, StripeSettings
from meterd.services.ledger_check import check_ledger
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.stripe_server import SECRET_KEY, LocalStripe
from tests.twilio_payloads import call_status_params

from .test_metering import START, balances, call_view, deliver
from .test_metering import account as metered_account
from .test_payments import account, intents, make_client, pay_params, ring, run_call
from .twilio_app import ManualClock, admin, agents, build_app, post_twilio

BLOCK = 3000  # block_price_minor: 30 minutes
SYSTEM_MONEY_BOOKS = (
    "system:USD:card_receipts",
    "system:USD:block_revenue",
    "system:USD:usage_revenue",
    "system:USD:incident_revenue",
)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def localstripe():
    server = LocalStripe().start()
    yield server
    server.stop()


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, localstripe):
    """Block mode (the default), cards through localstripe."""
    localstripe.reset()
    client = await make_client(aiohttp_client, database, tmp_path, localstripe.base_url)
    yield client
    await client.gateway.close()


@pytest.fixture
async def authorizing(aiohttp_client, database, tmp_path, localstripe):
    """Authorise mode: a hold of 30 minutes x the rate, captured at settlement."""
    localstripe.reset()
    client = await make_client(
        aiohttp_client,
        database,
        tmp_path,
        localstripe.base_url,
        METERD_CARD_MODE="authorize",
        METERD_AUTHORIZE_MINUTES="30",
    )
    yield client
    await client.gateway.close()


@pytest.fixture
async def plain(aiohttp_client, database, tmp_path):
    """No card gateway: bank and deposit only."""
    clock = ManualClock(START)
    client = await aiohttp_client(
        build_app(database, tmp_path, clock, METERD_SETTLE_DELAY_SECONDS="60")
    )
    client.clock = clock
    return client


class ControlledGateway:
    """The real Stripe gateway with two faults a test switches on for the next charge: held in
    flight until `release` is set (`hold_next_charge`), or carried out at Stripe with its
    answer lost, as a timeout on our side (`lose_next_answer`)."""

    def __init__(self, inner: StripeGateway) -> None:
        self.inner = inner
        self.hold_next_charge = False
        self.charge_in_flight = asyncio.Event()
        self.release = asyncio.Event()
        self.lose_next_answer = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def charge(self, key, card, amount_minor, currency):
        if self.hold_next_charge:
            self.hold_next_charge = False
            self.charge_in_flight.set()
            await self.release.wait()
        result = await self.inner.charge(key, card, amount_minor, currency)
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise GatewayUnavailable("TimeoutError")
        return result


@pytest.fixture
async def controlled(aiohttp_client, database, tmp_path, localstripe):
    """Block mode with a ControlledGateway in front of localstripe."""
    localstripe.reset()
    inner = StripeGateway(StripeSettings(secret_key=SECRET_KEY, api_base_url=localstripe.base_url))
    gateway = ControlledGateway(inner)
    clock = ManualClock(START)
    client = await aiohttp_client(
        build_app(database, tmp_path, clock, gateway=gateway, METERD_SETTLE_DELAY_SECONDS="60")
    )
    client.clock = clock
    client.gateway = gateway
    yield client
    await inner.close()


# --- helpers --------------------------------------------------------------------------------


def at(offset: int) -> dt.datetime:
    return START + dt.timedelta(seconds=offset)


async def ledger_totals(client, **query: str) -> dict[str, int]:
    """Net postings per book of the ledger's transactions matching `query` (ledger API)."""
    totals: dict[str, int] = defaultdict(int)
    after_id = 0
    while True:
        path = "/admin/ledger?" + urlencode({**query, "after_id": after_id, "limit": 500})
        response = await admin(client, "GET", path)
        assert response.status == 200, await response.text()
        page = await response.json()
        for transaction in page["transactions"]:
            for posting in transaction["postings"]:
                totals[posting["book"]] += posting["amount"]
        if page["next_after_id"] is None:
            return dict(totals)
        after_id = page["next_after_id"]


async def account_state(client) -> tuple[int, int, int]:
    """(bank minutes, deposit, receivable) of acme: admin API, and the ledger API for what the
    customer owes (negative when owed)."""
    bank, deposit = await balances(client)
    receivable = (await ledger_totals(client, account_id="acme")).get("customer:acme:receivable", 0)
    return bank, deposit, receivable


def kept(intent) -> int:
    """What the card keeps of a PaymentIntent: a charge or capture less its refunds; nothing
    of a hold still uncaptured, released or failed."""
    if intent.status != "succeeded":
        return 0
    charge = intent.latest_charge
    return int(charge.amount) - int(charge.amount_refunded)


async def card_summary(localstripe) -> tuple[int, int, list]:
    """(kept in total, number of intents keeping money, holds not released) over every
    PaymentIntent of the test (localstripe is reset for each one)."""
    every = await intents(localstripe, "")
    keeping = [i for i in every if kept(i) > 0]
    holds = [i for i in every if i.status == "requires_capture"]
    return sum(kept(i) for i in every), len(keeping), holds


async def settle_payments(client, rounds: int = 3) -> None:
    """The payments job, as often as settlement, refunds and resolution may need, with the
    clock moved past `payment_resolve_after_seconds` so nothing is left in flight."""
    services = client.app[SERVICES]
    for _ in range(rounds):
        await services.payments.run()
        client.clock.advance(61)
        await services.metering.tick()
    await services.payments.run()


async def assert_system_books_net_zero(client, call_sid: str) -> None:
    totals = await ledger_totals(client, call_sid=call_sid)
    nonzero = {book: totals[book] for book in SYSTEM_MONEY_BOOKS if totals.get(book, 0)}
    assert nonzero == {}, f"the call's system money books do not net to 0: {nonzero}"


async def waive(client, call_sid: str) -> None:
    body = {"call_sid": call_sid, "agent_id": "alice", "reason": "software_defect"}
    response = await agents(client, "/agents/waiver", body)
    assert response.status == 200, await response.text()


async def assert_as_if_never_charged(client, localstripe, call_sid, before) -> None:
    """The waived call left no trace in the account's money (see the module's docstring)."""
    state = await account_state(client)
    assert state == before, f"(bank, deposit, receivable) {state}, before the call {before}"
    kept_total, _, holds = await card_summary(localstripe)
    every = sorted((int(i.amount), kept(i)) for i in await intents(localstripe, ""))
    assert kept_total == 0, f"the card keeps {kept_total}: (charged, kept) {every}"
    assert holds == [], f"{len(holds)} authorisation(s) never released"
    await assert_system_books_net_zero(client, call_sid)
    assert (await check_ledger(client.app[SERVICES].database)).ok


async def drive(
    client, scripts, seconds: int, *, actions=None, pay_after_settling=True, step: int = 20
):
    """Calls with the customer and agent alice from 0 s to `seconds`; the tick and the
    payments job every `step` seconds; `actions` {offset: coroutine function} run at their
    offset; then the calls end, pass the settlement delay and are settled (and their payments
    sent, unless not)."""
    services = client.app[SERVICES]
    actions = dict(actions or {})
    for script in scripts:
        script.join("customer", 0).join("agent:alice", 0)
        await deliver(client, script.events)
    while client.clock.now < at(seconds):
        client.clock.advance(step)
        offset = int((client.clock.now - START).total_seconds())
        for when in sorted(w for w in actions if w <= offset):
            await actions.pop(when)()
        await services.metering.tick()
        await services.payments.run()
    for script in scripts:
        script.leave("agent:alice", seconds).end(seconds)
        await deliver(client, script.events[3:] + script.status_events)
    client.clock.now = at(seconds + 61)
    await services.metering.tick()
    if pay_after_settling:
        await services.payments.run()
    for script in scripts:
        assert (await call_view(client, script))["settled_at"] is not None


async def connect_paying_by_card(client, n: int = 1) -> CallScript:
    """A caller with no funds rings, enters a good card with <Pay>, and is connected."""
    script, _ = await ring(client, n)
    twiml = await (
        await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
    ).text()
    assert f">{script.call_sid}</Conference>" in twiml, twiml
    return script


async def add_rate(client, kind: str, amount_minor: int, effective_from: dt.datetime) -> None:
    body = {
        "kind": kind,
        "currency": "USD",
        "amount_minor": amount_minor,
        "effective_from": effective_from.isoformat(),
    }
    response = await admin(client, "POST", "/admin/rates", body)
    assert response.status == 201, await response.text()


# --- waivers and cards ----------------------------------------------------------------------


async def test_a_per_incident_call_waived_during_the_call_keeps_no_card_money(client, localstripe):
    """Defect 2: per incident, card, no deposit, waived at 300 s of 600: 5000 kept, 0 refunded."""
    await account(client, plan="per_incident")
    assert (await client.app[SERVICES].payments.save_card("acme", "pm_card_visa")).ok
    before = await account_state(client)
    script, twiml = await ring(client)
    assert "<Conference" in twiml  # per incident: nothing to pay before connecting
    await drive(client, [script], 600, actions={300: lambda: waive(client, script.call_sid)})
    await settle_payments(client)
    await assert_as_if_never_charged(client, localstripe, script.call_sid, before)
    view = await call_view(client, script)
    assert view["charges"]["waived"] is True and view["charges"]["incidents"] == 0


async def test_a_waiver_between_settlement_and_capture_leaves_nothing_captured(
    authorizing, localstripe
):
    """Defect 3: authorise mode, 10 minutes, waived after settlement before capture: 1000 kept."""
    client = authorizing
    await account(client)
    before = await account_state(client)
    script = await connect_paying_by_card(client)  # holds 30 x 100 = 3000
    await drive(client, [script], 600, pay_after_settling=False)  # capture of 1000 queued
    await waive(client, script.call_sid)
    await settle_payments(client)
    await assert_as_if_never_charged(client, localstripe, script.call_sid, before)


async def test_blocks_bought_during_a_waived_call_are_all_refunded(client, localstripe):
    """Defect 4: 60 min call waived at 600 s: 9000 charged, 3000 refunded, 60 left in the bank."""
    await account(client)
    before = await account_state(client)
    script = await connect_paying_by_card(client)  # block 1 at the gate
    await drive(
        client, [script], 3600, actions={600: lambda: waive(client, script.call_sid)}, step=30
    )
    await settle_payments(client)
    await assert_as_if_never_charged(client, localstripe, script.call_sid, before)


async def test_a_waiver_after_a_capture_books_its_refund_once(authorizing, localstripe):
    """Defect 5: 1000 captured, then waived: card_receipts +1000 and block_revenue -1000 left."""
    client = authorizing
    await account(client)
    before = await account_state(client)
    script = await connect_paying_by_card(client)
    await run_call(client, script, 600)  # 10 minutes x 100 = 1000 captured, 2000 released
    kept_total, _, _ = await card_summary(localstripe)
    assert kept_total == 1000
    await waive(client, script.call_sid)
    await settle_payments(client)
    await assert_as_if_never_charged(client, localstripe, script.call_sid, before)


# --- funding order and one authority per account --------------------------------------------


async def test_the_deposit_is_used_before_a_card_block_is_bought(client, localstripe, database):
    """Defect 6: bank 0, deposit 500, card, 10 min: bank 25 / deposit 0, one block (not 20/500)."""
    await account(client)
    response = await admin(
        client, "POST", "/admin/accounts/acme/deposits", {"amount_minor": 500, "reference": "d1"}
    )
    assert response.status == 201
    assert (await client.app[SERVICES].payments.save_card("acme", "pm_card_visa")).ok
    script, twiml = await ring(client)
    assert f">{script.call_sid}</Conference>" in twiml  # the deposit pays a minute: no charge
    await run_call(client, script, 600)
    await settle_payments(client)
    # minutes 1-5 from the deposit (5 x 100 = 500), then one block (30), minutes 6-10 from it
    assert await account_state(client) == (25, 0, 0)
    kept_total, keeping, holds = await card_summary(localstripe)
    assert (kept_total, keeping, holds) == (BLOCK, 1, [])
    assert (await check_ledger(database)).ok


async def test_a_block_bought_ahead_for_two_agents_leaves_no_deposit_money_unused(
    client, localstripe, database
):
    """Bank 0, deposit 500, card, two agents for 5 minutes. After minute 2 of each the deposit
    holds one minute for two agents on the line, so meterd buys the block then (a whole
    increment before it is needed) and the bank pays minute 3 of both. The funding order pays
    one of them from the deposit: settlement moves it there. 5 + 5 minutes: bank 25 / deposit
    0, one block (live it was 24 / 100)."""
    await account(client)
    deposit = {"amount_minor": 500, "reference": "d1"}
    assert (await admin(client, "POST", "/admin/accounts/acme/deposits", deposit)).status == 201
    assert (await client.app[SERVICES].payments.save_card("acme", "pm_card_visa")).ok
    script, _ = await ring(client)
    services = client.app[SERVICES]
    script.join("customer", 0).join("agent:alice", 0).join("agent:bob", 0)
    await deliver(client, script.events)
    while client.clock.now < at(300):
        client.clock.advance(20)
        await services.metering.tick()
        await services.payments.run()
    assert (await account_state(client))[1] == 100  # live: the block paid bank first
    script.leave("agent:alice", 300).leave("agent:bob", 300).end(300)
    await deliver(client, script.events[4:] + script.status_events)
    client.clock.now = at(361)
    await services.metering.tick()
    assert (await call_view(client, script))["settled_at"] is not None
    await settle_payments(client)
    assert await account_state(client) == (25, 0, 0)
    assert (await card_summary(localstripe))[:2] == (BLOCK, 1)
    assert (await check_ledger(database)).ok


async def test_two_concurrent_calls_needing_a_top_up_in_one_tick_buy_one_block(
    client, localstripe, database
):
    """Defect 7: bank 2, card, two 5-minute calls run dry in one tick: one block (3000), not two."""
    await account(client)
    grant = {"minutes": 2, "reference": "b"}
    assert (await admin(client, "POST", "/admin/accounts/acme/minutes", grant)).status == 201
    assert (await client.app[SERVICES].payments.save_card("acme", "pm_card_visa")).ok
    scripts = []
    for n in (1, 2):
        script, twiml = await ring(client, n)
        assert f">{script.call_sid}</Conference>" in twiml  # a banked minute each: no charge
        scripts.append(script)
    # the first tick takes minute 1 of each call: the bank is empty for both at once
    await drive(client, scripts, 300)
    await settle_payments(client)
    # 10 agent-minutes: 2 banked + one block of 30 = 32, 22 left
    kept_total, keeping, holds = await card_summary(localstripe)
    assert (kept_total, keeping, holds) == (BLOCK, 1, [])
    assert await account_state(client) == (22, 0, 0)
    assert (await check_ledger(database)).ok


# --- rates ----------------------------------------------------------------------------------


async def test_an_incident_is_priced_at_the_calls_end_not_at_settlement(plain, database):
    """Defect 8: call ends at 600 s, incident 9000 from 630 s, settled after: 5000, not 9000."""
    client = plain
    await metered_account(client, plan="per_incident", deposit_minor=20_000)
    script = CallScript(1, START)
    assert (
        "<Conference" in await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    )
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    client.clock.now = at(600)
    script.leave("agent:alice", 600).end(600)
    await deliver(client, script.events[3:] + script.status_events)
    client.clock.now = at(620)
    await add_rate(client, "incident", 9000, at(630))
    client.clock.now = at(700)
    await client.app[SERVICES].metering.tick()
    view = await call_view(client, script)
    assert view["settled_at"] is not None
    assert view["charges"]["incidents"] == 1
    assert await balances(client) == (45, 20_000 - 5000)
    totals = await ledger_totals(client, call_sid=script.call_sid)
    assert totals.get("system:USD:incident_revenue", 0) == 5000
    assert (await check_ledger(database)).ok


async def test_the_gate_refuses_a_deposit_below_the_rate_in_force(plain, database):
    """Defect 9: rate 250 in force (configured 100), deposit 150: not connected without payment."""
    client = plain
    await metered_account(client, products=[], deposit_minor=150)
    await add_rate(client, "per_agent_minute", 250, at(-3600))
    script = CallScript(1, START)
    twiml = await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    assert "<Conference" not in twiml, "connected on a deposit worth less than one minute"
    assert (await call_view(client, script))["status"] != "connected"
    assert (await check_ledger(database)).ok


async def test_the_gate_connects_a_deposit_covering_the_rate_in_force(plain, database):
    """Defect 9: rate 50 in force (configured 100), deposit 80: connected."""
    client = plain
    await metered_account(client, products=[], deposit_minor=80)
    await add_rate(client, "per_agent_minute", 50, at(-3600))
    script = CallScript(1, START)
    twiml = await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    assert f">{script.call_sid}</Conference>" in twiml, twiml
    assert (await call_view(client, script))["status"] == "connected"
    assert (await check_ledger(database)).ok


async def test_authorise_mode_collects_every_minute_after_a_rate_rise(authorizing, localstripe):
    """Defect 10: rate 100 -> 250 at 300 s, 20 min authorised: 4250 due, 3000 captured, 1250 lost"""
    client = authorizing
    await account(client)
    await add_rate(client, "per_agent_minute", 250, at(300))
    script = await connect_paying_by_card(client)  # holds 30 x 100 = 3000
    await run_call(client, script, 1200)
    await settle_payments(client)
    # minutes 1-5 (due at 0..240 s) x 100 + minutes 6-20 (due at 300..1140 s) x 250 = 4250
    totals = await ledger_totals(client, call_sid=script.call_sid)
    assert totals.get("system:USD:usage_revenue", 0) == 4250
    captured, _, holds = await card_summary(localstripe)
    _, _, receivable = await account_state(client)
    assert captured + -receivable == 4250, f"captured {captured}, owed {-receivable}"
    assert holds == []
    assert (await check_ledger(client.app[SERVICES].database)).ok


# --- settlement and research ----------------------------------------------------------------


async def test_research_started_as_the_call_is_chosen_for_settlement_is_not_lost(plain, database):
    """Defect 11: research starts as the call is settled, stops 30 min later: 32 minutes, not 2."""
    client = plain
    await metered_account(client)
    script = CallScript(1, START)
    assert (
        "<Conference" in await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    )
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    metering = client.app[SERVICES].metering
    client.clock.now = at(60)
    await metering.tick()
    client.clock.now = at(120)
    script.leave("agent:alice", 120).end(120)
    await deliver(client, script.events[3:] + script.status_events)
    client.clock.now = at(200)  # past ended (120 s) + settle_delay (60 s): due for settlement
    body = {"call_sid": script.call_sid, "agent_id": "alice", "action": "start"}
    assert (await agents(client, "/agents/research", body)).status == 200
    # the tick chose the call before research started; its settlement comes now
    settled_now = await metering.settle_call(script.call_sid)
    assert not settled_now, "settled with research open"
    assert (await call_view(client, script))["settled_at"] is None
    client.clock.now = at(200 + 1800)
    body["action"] = "stop"
    response = await agents(client, "/agents/research", body)
    assert response.status == 200, await response.text()
    client.clock.advance(61)
    await metering.tick()
    view = await call_view(client, script)
    assert view["settled_at"] is not None
    # active 0..120 s + research 200..2000 s = 1920 s = 32 minutes
    assert view["agents"]["alice"]["agent_minutes"] == 32
    totals = await ledger_totals(client, call_sid=script.call_sid)
    assert totals.get("system:minutes:used", 0) == 32  # the ledger's minutes for the call
    assert view["charges"]["bank_minutes"] == 32
    assert await balances(client) == (45 - 32, 0)
    assert (await check_ledger(database)).ok


# --- the connect-time charge ----------------------------------------------------------------


async def test_a_hang_up_while_the_connect_charge_is_in_flight_keeps_no_card_money(
    controlled, localstripe, database
):
    """Defect 12: hang-up during the connect charge: 3000 kept, call connected again, unsettled."""
    client = controlled
    await account(client)
    script, twiml = await ring(client)
    assert "<Pay" in twiml
    client.gateway.hold_next_charge = True
    paying = asyncio.create_task(
        post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
    )
    await asyncio.wait_for(client.gateway.charge_in_flight.wait(), 10)
    hung_up = call_status_params(
        script.call_sid,
        "completed",
        0,
        client.clock.now,
        from_number=CUSTOMER_NUMBER,
        duration_seconds=20,
    )
    hanging_up = asyncio.create_task(post_twilio(client, "/twilio/call-status", hung_up))
    await asyncio.wait({hanging_up}, timeout=2)  # at once, unless it waits for the payment
    client.gateway.release.set()
    await (await paying).text()
    assert (await hanging_up).status == 204
    client.clock.advance(61)
    await client.app[SERVICES].metering.tick()
    await settle_payments(client)
    view = await call_view(client, script)
    assert view["status"] in ("ended", "rejected"), view["status"]
    assert view["settled_at"] is not None
    kept_total, keeping, holds = await card_summary(localstripe)
    assert (kept_total, holds) == (0, []), f"the card keeps {kept_total} ({keeping} payment(s))"
    assert await account_state(client) == (0, 0, 0)
    await assert_system_books_net_zero(client, script.call_sid)
    assert (await check_ledger(database)).ok


@pytest.mark.parametrize("retry", ["pay_attempt_2", "calling_again"])
async def test_a_connect_charge_that_timed_out_but_succeeded_is_not_charged_again(
    controlled, localstripe, database, retry
):
    """Defect 13: a charge timed out at our side succeeds at Stripe; caller retries: 2 blocks."""
    client = controlled
    await account(client)
    script, twiml = await ring(client)
    assert "<Pay" in twiml
    client.gateway.lose_next_answer = True
    twiml = await (
        await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
    ).text()
    assert "<Conference" not in twiml  # no answer from the gateway: never connected on that
    kept_total, _, _ = await card_summary(localstripe)
    assert kept_total == BLOCK  # yet Stripe took the block
    client.clock.advance(5)
    if retry == "pay_attempt_2":
        await (
            await post_twilio(client, "/twilio/pay?attempt=2", pay_params(script.call_sid))
        ).text()
    else:  # the caller hangs up and calls again; the card saved on attempt 1 is on file
        hung_up = call_status_params(
            script.call_sid,
            "completed",
            0,
            client.clock.now,
            from_number=CUSTOMER_NUMBER,
            duration_seconds=40,
        )
        assert (await post_twilio(client, "/twilio/call-status", hung_up)).status == 204
        again = CallScript(2, client.clock.now)
        await (await post_twilio(client, "/twilio/voice", again.voice())).text()
    await settle_payments(client)
    kept_total, keeping, holds = await card_summary(localstripe)
    assert kept_total <= BLOCK and keeping <= 1, f"{keeping} blocks charged, {kept_total} kept"
    assert holds == []
    # what the card keeps is in the bank, no more and no less
    assert await account_state(client) == (30 * kept_total // BLOCK, 0, 0)
    assert (await check_ledger(database)).ok


async def test_a_card_incident_left_in_flight_by_a_crash_then_waived_is_not_owed(
    client, localstripe, database
):
    """A per-incident charge claimed for the card (`sent`) when the daemon died, the call then
    waived: the gateway never saw it, so it fails on resolution; the waived call owes nothing
    (no receivable), and nothing is charged."""
    await account(client, plan="per_incident")
    assert (await client.app[SERVICES].payments.save_card("acme", "pm_card_visa")).ok
    before = await account_state(client)
    script, _ = await ring(client)
    await drive(client, [script], 600, pay_after_settling=False)  # the incident is queued
    async with database.write() as connection:  # claimed, then the process died
        await connection.exec_driver_sql(
            "UPDATE payment_operations SET status = 'sent' WHERE kind = 'incident'"
        )
    await waive(client, script.call_sid)
    await settle_payments(client)  # resolution: never received at the gateway -> failed
    await assert_as_if_never_charged(client, localstripe, script.call_sid, before)
    view = await call_view(client, script)
    assert view["charges"]["owed_minor"] == 0 and view["charges"]["incidents"] == 0
