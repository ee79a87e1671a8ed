"""The funding authority (meterd/services/funding.py) on in-memory repositories: every decision
of docs/billing.md's funding order, without a database. The same code runs on SQLite and
PostgreSQL in tests/integration (test_funding_defects.py, test_money_model.py)."""

from __future__ import annotations

import datetime as dt

from meterd.core import ledger
from meterd.core.rating import Source
from meterd.services.funding import FundingAuthority
from tests.fakes.repositories import FakeCardPayments, FakeRates, Repositories, Store

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
SID = "CA" + "1" * 32
OTHER_SID = "CA" + "2" * 32


def _authority(
    *,
    card_mode: str = "block",
    allow_debt: bool = False,
    rates: FakeRates | None = None,
    payments: FakeCardPayments | None = None,
) -> FundingAuthority:
    return FundingAuthority(
        rates or FakeRates(100),  # type: ignore[arg-type]
        payments or FakeCardPayments(),
        card_mode=card_mode,
        allow_debt=allow_debt,
        repositories=Repositories,  # type: ignore[arg-type]
    )


def _store(**account: object) -> Store:
    store = Store()
    store.add_account("A1", **account)  # type: ignore[arg-type]
    store.add_call(SID)
    store.add_call(OTHER_SID)
    return store


async def test_the_gate_connects_with_a_banked_minute_or_one_minute_of_deposit():
    authority = _authority()
    assert await authority.can_connect(_store(bank_minutes=1), "A1", SID, NOW)
    assert await authority.can_connect(_store(deposit_minor=100), "A1", SID, NOW)
    assert not await authority.can_connect(_store(deposit_minor=99), "A1", SID, NOW)


async def test_the_gate_asks_the_rate_in_force_now():
    cheaper = FakeRates(100, {NOW - dt.timedelta(seconds=1): 50})
    later = FakeRates(100, {NOW + dt.timedelta(seconds=1): 50})
    assert await _authority(rates=cheaper).can_connect(_store(deposit_minor=50), "A1", SID, NOW)
    assert not await _authority(rates=later).can_connect(_store(deposit_minor=50), "A1", SID, NOW)


async def test_a_minute_is_funded_bank_then_deposit_then_owed_or_debt():
    store = _store(bank_minutes=1, deposit_minor=150)
    account = await Repositories(store).accounts.lock("A1")
    call = await Repositories(store).calls.lock(SID)
    authority = _authority()
    assert (await authority.fund_minute(store, account, call, NOW)).source is Source.BANK
    store.books[ledger.bank_book("A1")]["balance"] = 0
    funding = await authority.fund_minute(store, account, call, NOW)
    assert (funding.source, funding.amount_minor) == (Source.DEPOSIT, 100)
    store.books[ledger.deposit_book("A1")]["balance"] = 99
    funding = await authority.fund_minute(store, account, call, NOW)
    assert (funding.source, funding.amount_minor) == (Source.RECEIVABLE, 100)
    debt = await _authority(allow_debt=True).fund_minute(store, account, call, NOW)
    assert (debt.source, debt.amount_minor) == (Source.DEBT, 100)


async def test_a_minute_is_priced_at_the_rate_in_force_when_it_fell_due():
    store = _store(deposit_minor=1000)
    account = await Repositories(store).accounts.lock("A1")
    call = await Repositories(store).calls.lock(SID)
    authority = _authority(rates=FakeRates(100, {NOW: 70}))
    before = await authority.fund_minute(store, account, call, NOW - dt.timedelta(seconds=1))
    after = await authority.fund_minute(store, account, call, NOW)
    assert (before.amount_minor, after.amount_minor) == (100, 70)


async def test_a_waived_call_or_another_plan_is_metered_at_no_charge():
    store = _store(bank_minutes=5)
    account = await Repositories(store).accounts.lock("A1")
    store.calls[SID]["waived_at"] = NOW
    store.calls[OTHER_SID]["plan"] = "service_agreement"
    authority = _authority()
    for sid in (SID, OTHER_SID):
        call = await Repositories(store).calls.lock(sid)
        assert (await authority.fund_minute(store, account, call, NOW)).source is Source.COVERED


async def test_the_block_is_bought_when_the_funds_cannot_pay_every_accruing_agent():
    store = _store(bank_minutes=1, deposit_minor=150, card=True)
    account = await Repositories(store).accounts.lock("A1")
    authority = _authority()
    funds, card_behind = await authority.keep_funded(store, account, SID, 2, NOW)
    assert (funds.minutes_left, card_behind) == (2, True)
    assert store.card_operations == []  # two minutes left for two agents: not yet
    funds, card_behind = await authority.keep_funded(store, account, SID, 3, NOW)
    assert card_behind and [op["kind"] for op in store.card_operations] == ["charge"]


async def test_one_block_on_its_way_serves_every_call_of_the_account():
    store = _store(card=True)
    account = await Repositories(store).accounts.lock("A1")
    authority = _authority()
    await authority.keep_funded(store, account, SID, 1, NOW)
    await authority.keep_funded(store, account, OTHER_SID, 1, NOW)
    await authority.keep_funded(store, account, SID, 1, NOW)
    assert len(store.card_operations) == 1


async def test_in_authorise_mode_an_authorisation_serves_only_its_own_call():
    store = _store(card=True)
    account = await Repositories(store).accounts.lock("A1")
    authority = _authority(card_mode="authorize", payments=FakeCardPayments(kind="authorize"))
    await authority.keep_funded(store, account, SID, 1, NOW)
    await authority.keep_funded(store, account, OTHER_SID, 1, NOW)
    await authority.keep_funded(store, account, SID, 1, NOW)
    assert [op["call_sid"] for op in store.card_operations] == [SID, OTHER_SID]


async def test_without_a_usable_card_the_call_is_to_be_announced():
    no_card = _store()
    account = await Repositories(no_card).accounts.lock("A1")
    assert (await _authority().keep_funded(no_card, account, SID, 1, NOW))[1] is False
    down = _store(card=True)
    account = await Repositories(down).accounts.lock("A1")
    payments = FakeCardPayments(available=False)
    assert (await _authority(payments=payments).keep_funded(down, account, SID, 1, NOW))[1] is False
    failed = _store(card=True)
    failed.add_card_operation(account_id="A1", call_sid=SID, kind="charge", status="failed")
    account = await Repositories(failed).accounts.lock("A1")
    assert (await _authority().keep_funded(failed, account, SID, 1, NOW))[1] is False
    assert len(failed.card_operations) == 1  # a declined card is not tried again on this call


async def test_a_decline_is_resolved_by_a_card_payment_of_the_account_that_succeeds_after_it():
    """A caller of the account gave a new card at the gate and its payment succeeded: the call
    whose card payment was declined buys again (the model run's case, issue 11)."""
    for card_mode, kind in (("block", "charge"), ("authorize", "authorize")):
        store = _store(card=True)
        store.add_card_operation(account_id="A1", call_sid=SID, kind=kind, status="failed")
        store.add_card_operation(account_id="A1", call_sid=OTHER_SID, kind=kind, status="failed")
        account = await Repositories(store).accounts.lock("A1")
        authority = _authority(card_mode=card_mode, payments=FakeCardPayments(kind=kind))
        assert (await authority.keep_funded(store, account, SID, 1, NOW))[1] is False
        store.add_card_operation(account_id="A1", call_sid=OTHER_SID, kind=kind, status="succeeded")
        assert (await authority.keep_funded(store, account, SID, 1, NOW))[1] is True
        assert [op["call_sid"] for op in store.card_operations][-1] == SID  # bought again


async def test_an_authorisation_pays_what_it_still_holds():
    store = _store(card=True)
    store.add_card_operation(
        account_id="A1", call_sid=SID, kind="authorize", status="succeeded", amount_minor=250
    )
    account = await Repositories(store).accounts.lock("A1")
    call = await Repositories(store).calls.lock(SID)
    authority = _authority(card_mode="authorize")
    funding = await authority.fund_minute(store, account, call, NOW)
    assert (funding.source, funding.amount_minor) == (Source.CARD, 100)
    minute = ledger.minute(
        SID, "a1", 1, account_id="A1", currency="USD", source="card", amount_minor=200
    )
    await Repositories(store).ledger.post(minute, NOW)
    funds = await authority.funds(store, account, SID, NOW)
    assert (funds.card_hold_minor, funds.minutes_left) == (50, 0)


async def test_an_incident_is_paid_by_the_deposit_else_the_card_else_owed():
    key = "incident:" + SID + ":1"
    authority = _authority()
    store = _store(deposit_minor=500, card=True)
    account = await Repositories(store).accounts.lock("A1")
    assert await authority.incident_payer(store, account, SID, key, 500) == "deposit"
    assert await authority.incident_payer(store, account, SID, key, 501) is None  # to the card
    assert [op["operation_key"] for op in store.card_operations] == [key]
    assert await authority.incident_payer(store, account, SID, key, 501) is None  # on its way
    store.card_operations[0]["status"] = "failed"
    assert await authority.incident_payer(store, account, SID, key, 501) == "receivable"
