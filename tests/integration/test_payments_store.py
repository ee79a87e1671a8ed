"""The payment operations table on SQLite and PostgreSQL: one operation per key, and a status
that moves forward once (queued -> sent -> succeeded or failed), whoever races to move it."""

from __future__ import annotations

import datetime as dt

from meterd.store import payments_store
from meterd.store.database import Database
from meterd.store.payments_store import PaymentKind, PaymentStatus

from .helpers import NOW, make_account


async def _queue(database: Database, key: str, amount_minor: int = 500) -> None:
    async with database.write() as connection:
        await payments_store.insert_operation(
            connection,
            key=key,
            kind=PaymentKind.CHARGE,
            account_id="A1",
            call_sid="CA1",
            amount_minor=amount_minor,
            currency="USD",
            minutes=30,
            related_key=None,
            status=PaymentStatus.QUEUED,
            created_at=NOW,
        )


async def test_an_operation_is_recorded_once_per_key(database):
    await make_account(database, "A1")
    await _queue(database, "call:CA1:block:1", 500)
    await _queue(database, "call:CA1:block:1", 999)
    async with database.read() as connection:
        operation = await payments_store.get_operation(connection, "call:CA1:block:1")
        count = await payments_store.count_operations(connection, "CA1", PaymentKind.CHARGE)
    assert operation.amount_minor == 500 and count == 1


async def test_a_queued_operation_is_claimed_for_sending_once(database):
    await make_account(database, "A1")
    await _queue(database, "call:CA1:block:1")
    async with database.write() as connection:
        assert await payments_store.queued_keys(connection, 100) == ["call:CA1:block:1"]
        assert await payments_store.claim_queued(connection, "call:CA1:block:1")
        assert not await payments_store.claim_queued(connection, "call:CA1:block:1")
        assert await payments_store.queued_keys(connection, 100) == []
        status = await payments_store.operation_status(connection, "call:CA1:block:1")
    assert status is PaymentStatus.SENT


async def test_an_operation_completes_once_and_stays_completed(database):
    await make_account(database, "A1")
    await _queue(database, "call:CA1:block:1")
    later = NOW + dt.timedelta(seconds=5)
    async with database.write() as connection:
        key = "call:CA1:block:1"
        assert await payments_store.mark_succeeded(
            connection, key, reference="pi_1", completed_at=later
        )
        assert not await payments_store.mark_succeeded(
            connection, key, reference="pi_2", completed_at=later
        )
        assert not await payments_store.mark_failed(connection, key, error="no", completed_at=later)
        assert await payments_store.gateway_reference(connection, key) == "pi_1"
        assert await payments_store.operation_status(connection, key) is PaymentStatus.SUCCEEDED


async def test_cancelling_leaves_an_operation_already_sent_alone(database):
    await make_account(database, "A1")
    await _queue(database, "call:CA1:block:1")
    async with database.write() as connection:
        key = "call:CA1:block:1"
        await payments_store.claim_queued(connection, key)
        cancelled = await payments_store.mark_failed(
            connection,
            key,
            error="cancelled: nothing is owed",
            completed_at=NOW,
            from_statuses=(PaymentStatus.QUEUED,),
        )
        assert not cancelled
        assert await payments_store.operation_status(connection, key) is PaymentStatus.SENT
        assert await payments_store.sent_before(connection, NOW, 100) != []
        assert (
            await payments_store.sent_before(connection, NOW - dt.timedelta(seconds=1), 100) == []
        )


async def test_nothing_recorded_has_no_status(database):
    await make_account(database, "A1")
    async with database.read() as connection:
        assert await payments_store.operation_status(connection, "call:CA1:block:1") is None
        assert await payments_store.last_purchase(connection, "CA1") is None
