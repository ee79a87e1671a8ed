"""The payment operations table on SQLite and PostgreSQL: one operation per key, and a status
that moves forward once (queued -> sent -> succeeded or failed), whoever races to move it."""

from __future__ import annotations

import datetime as dt

from meterd.store import calls_store, payments_store
from meterd.store.calls_store import CallStatus
from meterd.store.database import Database
from meterd.store.payments_store import PaymentKind, PaymentStatus
from meterd.store.repositories import Repositories

from .helpers import NOW, make_account

SECOND = dt.timedelta(seconds=1)


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


async def _operation(database: Database, key: str, call_sid: str, kind=PaymentKind.CHARGE) -> None:
    async with database.write() as connection:
        await payments_store.insert_operation(
            connection,
            key=key,
            kind=kind,
            account_id="A1",
            call_sid=call_sid,
            amount_minor=3000,
            currency="USD",
            minutes=30,
            related_key=None,
            status=PaymentStatus.SENT,
            created_at=NOW,
        )


async def test_a_decline_is_resolved_by_a_payment_that_succeeds_after_it_whenever_it_was_made(
    database,
):
    """Call 2's block was sent before call 1's failed (a slow gateway) and succeeds after it:
    the card pays again, so call 1's decline is resolved (issue 11, the review of the fix)."""
    await make_account(database, "A1")
    await _operation(database, "call:CA2:block:1", "CA2")  # made first
    await _operation(database, "call:CA1:block:1", "CA1")
    async with database.write() as connection:
        await payments_store.mark_failed(
            connection, "call:CA1:block:1", error="declined", completed_at=NOW
        )
        cards = Repositories(connection).cards
        assert await cards.decline_unresolved("CA1", "A1")
        assert not await cards.decline_unresolved("CA2", "A1")  # in flight, not failed
        await payments_store.mark_succeeded(
            connection, "call:CA2:block:1", reference="pi_2", completed_at=NOW + SECOND
        )
        assert not await cards.decline_unresolved("CA1", "A1")


async def test_a_card_payment_wakes_the_accounts_unsettled_calls_without_delaying_any(database):
    """Connected calls, and an ended one whose research still runs, are looked at now; one due
    sooner keeps its time; a settled call and another account's are left alone."""
    await make_account(database, "A1")
    await make_account(database, "A2")
    later, sooner = NOW + 60 * SECOND, NOW - 5 * SECOND
    rows = {
        "CA1": ("A1", CallStatus.CONNECTED, later, None),
        "CA2": ("A1", CallStatus.ENDED, None, None),
        "CA3": ("A1", CallStatus.CONNECTED, sooner, None),
        "CA4": ("A1", CallStatus.ENDED, None, NOW),  # settled
        "CA5": ("A2", CallStatus.CONNECTED, later, None),
    }
    async with database.write() as connection:
        for sid, (account_id, status, due, settled) in rows.items():
            await calls_store.insert_call(connection, call_sid=sid, from_number="+1555", now=NOW)
            await calls_store.update_call(
                connection,
                sid,
                account_id=account_id,
                status=status,
                next_due_at=due,
                settled_at=settled,
            )
    async with database.write() as connection:
        await calls_store.wake_account_calls(connection, "A1", NOW)
    async with database.read() as connection:
        due = {sid: (await calls_store.get_call(connection, sid)).next_due_at for sid in rows}
    assert due == {"CA1": NOW, "CA2": NOW, "CA3": sooner, "CA4": None, "CA5": later}
