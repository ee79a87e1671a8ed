"""Live metering (meterd/services/metering.py and minute_posting.py) on in-memory repositories:
minutes posted as they fall due, once, funded in order, the call's schedule never lost, funds
watched, and a transaction that fails leaving nothing behind. The same service runs against
SQLite and PostgreSQL in tests/integration (test_metering*.py) and the real daemon in tests/e2e.
"""

from __future__ import annotations

import datetime as dt

import pytest

from meterd.config import OnExhausted
from meterd.core import ledger
from meterd.core.timeline import ConferenceEvent
from meterd.services.funding import FundingAuthority
from meterd.services.metering import MeteringService, MeteringSettings
from meterd.services.minute_posting import MinutePoster
from meterd.services.settlement import SettlementService
from meterd.store import ledger_store
from tests.fakes.repositories import (
    FakeCardPayments,
    FakeDatabase,
    FakeRates,
    Repositories,
    Store,
)
from tests.integration.twilio_app import ManualClock

START = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
SID = "CA" + "1" * 32
AGENT_LEG = "CA" + "a" * 32
SETTINGS = MeteringSettings(
    increment_seconds=60,
    research_max_minutes=120,
    on_exhausted=OnExhausted.ANNOUNCE,
    warn_minutes_left=1,
    grace_seconds=30,
    settle_delay_seconds=60,
    tick_batch_max=100,
    public_base_url="https://meterd.example",
)


def _scene(*, bank_minutes: int = 10, deposit_minor: int = 0, card: bool = False):
    """A connected per-minute call: the customer in at START, agent a1 joining at START."""
    store = Store()
    store.add_account("A1", bank_minutes=bank_minutes, deposit_minor=deposit_minor, card=card)
    store.add_call(SID, started_at=START, next_due_at=START)
    at = int(START.timestamp())
    store.add_event(SID, ConferenceEvent(1, at, "participant-join", SID, "customer"))
    store.add_event(SID, ConferenceEvent(2, at, "participant-join", AGENT_LEG, "agent:a1"))
    clock = ManualClock(START)
    payments = FakeCardPayments()
    funding = FundingAuthority(
        FakeRates(100),  # type: ignore[arg-type]
        payments,
        card_mode="block",
        allow_debt=False,
        repositories=Repositories,  # type: ignore[arg-type]
    )
    database = FakeDatabase(store)
    poster = MinutePoster(clock, funding, increment_seconds=60, repositories=Repositories)
    settlement = SettlementService(
        database,  # type: ignore[arg-type]
        clock,
        FakeRates(100),  # type: ignore[arg-type]
        payments,  # type: ignore[arg-type]
        funding,
        poster,
        increment_seconds=60,
        research_max_minutes=120,
        settle_delay_seconds=60,
        batch_max=100,
        repositories=Repositories,  # type: ignore[arg-type]
    )
    metering = MeteringService(
        database,  # type: ignore[arg-type]
        SETTINGS,
        clock,
        funding,
        poster,
        settlement,
        repositories=Repositories,  # type: ignore[arg-type]
    )
    return store, clock, metering


def _minute_keys(store: Store) -> list[str]:
    return [key for key in store.transactions if ":minute:" in key]


async def _tick_at(metering: MeteringService, clock: ManualClock, seconds: float):
    clock.now = START + dt.timedelta(seconds=seconds)
    return await metering.tick()


async def test_each_minute_is_posted_when_it_falls_due_from_the_bank():
    store, clock, metering = _scene(bank_minutes=10)
    assert (await _tick_at(metering, clock, 0)).minutes_posted == 1  # its first second begins
    assert (await _tick_at(metering, clock, 59)).minutes_posted == 0
    assert (await _tick_at(metering, clock, 60)).minutes_posted == 1  # the 61st second begins
    assert _minute_keys(store) == [
        ledger.minute_key(SID, "a1", 1),
        ledger.minute_key(SID, "a1", 2),
    ]
    assert store.balance(ledger.bank_book("A1")) == 8
    assert store.minutes_posted == {(SID, "a1"): 2}


async def test_a_tick_run_twice_in_the_same_second_posts_nothing_twice():
    store, clock, metering = _scene()
    for _ in range(3):
        await _tick_at(metering, clock, 1)
        await metering.meter_call(SID)
    assert len(_minute_keys(store)) == 1
    assert store.balance(ledger.bank_book("A1")) == 9


async def test_a_connected_call_with_an_agent_on_the_line_is_always_scheduled():
    store, clock, metering = _scene()
    for seconds in (0, 1, 2, 59, 60, 61, 119, 120, 121):
        await _tick_at(metering, clock, seconds)
        next_due_at = store.calls[SID]["next_due_at"]
        assert next_due_at is not None
        assert next_due_at <= clock.now + dt.timedelta(seconds=60)


async def test_a_backlog_is_posted_in_bounded_transactions_and_caught_up():
    store, clock, metering = _scene(bank_minutes=100)
    clock.now = START + dt.timedelta(seconds=40 * 60 + 1)
    report = await metering.tick()
    assert report.minutes_posted == 41  # 15 per transaction, carried on within the tick
    assert store.minutes_posted == {(SID, "a1"): 41}


async def test_deposit_after_the_bank_then_owed_and_the_exhausted_call_is_ended():
    store, clock, metering = _scene(bank_minutes=1, deposit_minor=100)
    await _tick_at(metering, clock, 1)  # minute 1, bank; one minute (the deposit's) left
    assert list(store.outbox) == [f"call:{SID}:announce:warn"]
    await _tick_at(metering, clock, 61)  # minute 2, deposit; nothing left
    assert store.balance(ledger.deposit_book("A1")) == 0
    assert list(store.outbox)[1:] == [f"call:{SID}:announce:exhausted"]
    assert store.calls[SID]["exhausted_at"] == START + dt.timedelta(seconds=61)
    await _tick_at(metering, clock, 90)  # grace (30 s) not over
    assert f"call:{SID}:hang_up" not in store.outbox
    await _tick_at(metering, clock, 121)  # minute 3 is owed; grace over: hang up, once
    await _tick_at(metering, clock, 122)
    kinds = [store.transactions[key]["transaction"].kind for key in _minute_keys(store)]
    assert kinds == ["minute_bank", "minute_deposit", "minute_receivable"]
    assert store.outbox[f"call:{SID}:hang_up"]["target_sid"] == SID


async def test_with_a_card_on_file_the_block_is_bought_instead_of_announcing():
    store, clock, metering = _scene(bank_minutes=1, card=True)
    await _tick_at(metering, clock, 1)
    assert [op["kind"] for op in store.card_operations] == ["charge"]
    assert store.outbox == {}


async def test_a_minute_that_cannot_be_written_leaves_the_call_as_it_was(monkeypatch):
    store, clock, metering = _scene()
    await _tick_at(metering, clock, 1)
    before = (dict(store.minutes_posted), store.balance(ledger.bank_book("A1")))

    async def refused(self, transaction, now):
        raise ledger_store.InsufficientBalance("refused")

    monkeypatch.setattr("tests.fakes.repositories.LedgerRepository.post", refused)
    clock.now = START + dt.timedelta(seconds=61)
    with pytest.raises(ledger_store.InsufficientBalance):
        await metering.meter_call(SID)
    assert (dict(store.minutes_posted), store.balance(ledger.bank_book("A1"))) == before


# --- the tick's batches ---------------------------------------------------------------------


def _more_calls(store, count: int) -> list[str]:
    """`count` more connected calls of account A1 like the scene's, agent a1 joining at START."""
    sids = []
    at = int(START.timestamp())
    for n in range(count):
        sid = "CA" + f"{n + 2:032d}"
        store.add_call(sid, started_at=START, next_due_at=START)
        store.add_event(sid, ConferenceEvent(1, at, "participant-join", sid, "customer"))
        store.add_event(sid, ConferenceEvent(2, at, "participant-join", AGENT_LEG, "agent:a1"))
        sids.append(sid)
    return sids


async def test_the_due_calls_of_a_tick_share_one_transaction_and_one_accounts_funds(
    monkeypatch,
):
    """Three calls of one account with 2 banked minutes and a deposit of one minute, due in
    the same tick: one write transaction; they are funded one after the other in it (bank,
    bank, deposit), exactly as three transactions would."""
    store, clock, metering = _scene(bank_minutes=2, deposit_minor=100)
    _more_calls(store, 2)
    writes = 0
    original = FakeDatabase.write

    def counting(self):
        nonlocal writes
        writes += 1
        return original(self)

    monkeypatch.setattr(FakeDatabase, "write", counting)
    assert (await _tick_at(metering, clock, 1)).minutes_posted == 3
    assert writes == 1
    kinds = sorted(store.transactions[key]["transaction"].kind for key in _minute_keys(store))
    assert kinds == ["minute_bank", "minute_bank", "minute_deposit"]
    assert (store.balance(ledger.bank_book("A1")), store.balance(ledger.deposit_book("A1"))) == (
        0,
        0,
    )


async def test_a_call_that_breaks_its_batch_holds_back_no_other_call(monkeypatch):
    """A call whose timeline cannot be built fails its batch: the batch is rolled back and
    each call metered in its own transaction, so the others' minutes are posted and the tick
    reports the one that failed."""
    store, clock, metering = _scene(bank_minutes=10)
    others = _more_calls(store, 2)
    broken = others[0]
    timeline = Repositories(store).calls.timeline.__func__

    async def failing(self, call, now, research_max_seconds):
        if call.call_sid == broken:
            raise ValueError("a damaged event")
        return await timeline(self, call, now, research_max_seconds)

    monkeypatch.setattr("tests.fakes.repositories.CallRepository.timeline", failing)
    report = await _tick_at(metering, clock, 1)
    assert report.errors == [f"{broken}: a damaged event"]
    assert {sid for (sid, _agent) in store.minutes_posted} == {SID, others[1]}
    assert store.balance(ledger.bank_book("A1")) == 8
    assert store.calls[broken]["next_due_at"] == START  # tried again at the next tick


async def test_a_call_metered_elsewhere_since_the_tick_listed_it_is_left_alone(monkeypatch):
    """Another daemon metered the call between the tick's list and its lock: its next minute
    is no longer due, so the batch does not touch it."""
    store, clock, metering = _scene(bank_minutes=10)
    later = START + dt.timedelta(seconds=60)
    lock_many = Repositories(store).calls.lock_many.__func__

    async def moved_meanwhile(self, call_sids):
        for call_sid in call_sids:
            store.calls[call_sid]["next_due_at"] = later  # what the other daemon left
        return await lock_many(self, call_sids)

    monkeypatch.setattr("tests.fakes.repositories.CallRepository.lock_many", moved_meanwhile)
    assert (await _tick_at(metering, clock, 1)).minutes_posted == 0
    assert store.calls[SID]["next_due_at"] == later


async def test_a_batch_funds_its_calls_most_overdue_first_whatever_their_sids():
    """Locks are taken in sid order, but the calls are metered in the order they fell due: the
    most overdue call (the larger sid here) gets the last banked minute."""
    store, clock, metering = _scene(bank_minutes=1, deposit_minor=100)
    (other,) = _more_calls(store, 1)
    assert other < SID
    store.calls[SID]["next_due_at"] = START - dt.timedelta(seconds=10)
    await _tick_at(metering, clock, 1)
    kinds = {
        key.split(":")[1]: store.transactions[key]["transaction"].kind
        for key in _minute_keys(store)
    }
    assert kinds == {SID: "minute_bank", other: "minute_deposit"}
