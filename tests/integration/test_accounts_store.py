"""The accounts, rates and outbox tables on SQLite and PostgreSQL: what the database refuses comes
back as the store's own error, saying what clashed, and each outbox attempt is claimed once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable

import pytest

from meterd.services.errors import Conflict
from meterd.services.rates import RateBook, RateKind
from meterd.store import accounts_store, outbox_store, rates_store
from meterd.store.accounts_store import AccountConflict, Clash
from meterd.store.database import Database
from meterd.store.rates_store import RateExists

from .helpers import NOW, account_service, fixed_clock, make_account


async def _insert(database: Database, account_id: str, pin_hash: str | None = None) -> None:
    async with database.write() as connection:
        await accounts_store.insert_account(
            connection,
            account_id=account_id,
            name=f"Account {account_id}",
            plan="per_minute",
            fallback_plan="per_minute",
            valid_until=None,
            currency="USD",
            pin_hash=pin_hash,
            products_json="[]",
            now=NOW,
        )


async def _clash(database: Database, account_id: str, pin_hash: str | None) -> Clash:
    with pytest.raises(AccountConflict) as refused:
        await _insert(database, account_id, pin_hash)
    return refused.value.clash


async def test_a_second_account_with_the_same_id_is_refused_as_an_id_clash(database):
    await _insert(database, "A1")
    assert await _clash(database, "A1", None) is Clash.ACCOUNT_ID


async def test_a_pin_another_account_holds_is_refused_as_a_pin_clash(database):
    await _insert(database, "A1", pin_hash="f" * 64)
    assert await _clash(database, "A2", "f" * 64) is Clash.PIN
    await _insert(database, "A2", pin_hash="e" * 64)
    with pytest.raises(AccountConflict) as refused:
        async with database.write() as connection:
            await accounts_store.update_account(connection, "A2", pin_hash="f" * 64)
    assert refused.value.clash is Clash.PIN


async def test_a_caller_id_the_account_has_is_refused_and_nothing_is_kept(database):
    await _insert(database, "A1")
    await _insert(database, "A2")
    async with database.write() as connection:
        await accounts_store.add_caller_ids(connection, "A1", ["+14155550100"])
        await accounts_store.add_caller_ids(connection, "A2", ["+14155550100"])  # may share
    with pytest.raises(AccountConflict) as refused:
        async with database.write() as connection:
            await accounts_store.add_caller_ids(connection, "A2", ["+14155550101"])
            await accounts_store.add_caller_ids(connection, "A2", ["+14155550100"])
    assert refused.value.clash is Clash.OTHER
    async with database.read() as connection:
        assert await accounts_store.account_caller_ids(connection, "A2") == ["+14155550100"]


async def test_changing_an_account_that_does_not_exist_changes_nothing(database):
    async with database.write() as connection:
        assert not await accounts_store.update_account(connection, "nobody", name="x")
        assert await accounts_store.account_currency(connection, "nobody") is None


async def test_a_second_rate_from_the_same_instant_is_refused_and_the_first_stays(database):
    async with database.write() as connection:
        await rates_store.add_rate(
            connection, kind="block", currency="USD", amount_minor=900, effective_from=NOW, now=NOW
        )
    with pytest.raises(RateExists):
        async with database.write() as connection:
            await rates_store.add_rate(
                connection,
                kind="block",
                currency="USD",
                amount_minor=100,
                effective_from=NOW,
                now=NOW,
            )
    async with database.read() as connection:
        assert await rates_store.rate_in_force(connection, "block", "USD", NOW) == 900
        before = NOW - dt.timedelta(seconds=1)
        assert await rates_store.rate_in_force(connection, "block", "USD", before) is None


async def test_an_outbox_request_is_recorded_once_and_each_attempt_claimed_once(database):
    async with database.write() as connection:
        for _ in range(2):
            await outbox_store.record_request(
                connection,
                request_key="call:CA1:hang-up",
                kind="hang_up",
                call_sid="CA1",
                target_sid="CA1",
                argument="",
                now=NOW,
            )
        [request] = await outbox_store.pending_requests(connection, 100)
        assert await outbox_store.claim_attempt(connection, request.outbox_id, 0)
        assert not await outbox_store.claim_attempt(connection, request.outbox_id, 0)
        await outbox_store.mark_done(connection, request.outbox_id, NOW)
        assert not await outbox_store.claim_attempt(connection, request.outbox_id, 1)
        assert await outbox_store.pending_requests(connection, 100) == []


async def _refusal(request: Awaitable[object]) -> str:
    with pytest.raises(Conflict) as refused:
        await request
    return refused.value.detail


async def test_the_service_answers_each_clash_with_its_own_409_message(database):
    accounts = account_service(database)
    await make_account(database, "A1", pin="1234")
    taken_pin = "that PIN is already used by another account; choose another"
    assert await _refusal(make_account(database, "A1")) == (
        "account A1 already exists; change it with PATCH"
    )
    assert await _refusal(make_account(database, "A2", pin="1234")) == taken_pin
    await make_account(database, "A2")
    assert await _refusal(accounts.change("A2", {"pin": "1234"})) == taken_pin
    rates = RateBook(database, fixed_clock, dict.fromkeys(RateKind, 0))
    body = {
        "kind": "block",
        "currency": "USD",
        "amount_minor": 900,
        "effective_from": "2026-11-20T15:00:00Z",
    }
    await rates.add(body)
    assert await _refusal(rates.add(body)) == (
        "a block rate in USD is already in force from 2026-11-20T15:00:00+00:00"
    )
