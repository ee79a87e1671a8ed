"""The repositories the funding authority and live metering work through, on one transaction.

`Repositories(connection)` gives them for the transaction `Database.write()` (or `read()`) opened:
calls, accounts, ledger, card operations and the outbox. The services take a factory of them
(`RepositoriesFactory`: this class in the daemon), so their unit tests run the same code on
in-memory repositories (tests/fakes/repositories.py) as well as on SQLite and PostgreSQL; a test
keeps the in-memory ones' methods the same as these.

Each method is one question or one change, named for what the service means by it; the SQL is
here and in the store modules these delegate to, never in a service.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.core import ledger
from meterd.core.timeline import Timeline
from meterd.store import calls_store, ledger_store, outbox_store, payments_store, timeline_store
from meterd.store.calls_store import CallStatus
from meterd.store.payments_store import IN_FLIGHT, PaymentKind, PaymentStatus
from meterd.store.schema import (
    accounts,
    calls,
    ledger_postings,
    ledger_transactions,
    outbox,
    payment_operations,
    research_marks,
)
from meterd.store.transaction import Record

CARD_PURCHASE_KINDS = (PaymentKind.CHARGE, PaymentKind.AUTHORIZE)


class CallRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def lock(self, call_sid: str) -> Record | None:
        """The call, locked while it is metered or settled (None: unknown, or another daemon
        holds it; see `calls_store.lock_call`)."""
        return await calls_store.lock_call(self._connection, call_sid)

    async def lock_many(self, call_sids: Sequence[str]) -> dict[str, Record]:
        """`lock` of each of a batch of calls, in one statement, in call_sid order."""
        return await calls_store.lock_calls(self._connection, call_sids)

    async def update(self, call_sid: str, **values: Any) -> None:
        await calls_store.update_call(self._connection, call_sid, **values)

    async def timeline(self, call: Record, now: dt.datetime, research_max_seconds: int) -> Timeline:
        return await timeline_store.load_timeline(self._connection, call, now, research_max_seconds)

    async def timelines(
        self, batch: Sequence[Record], now: dt.datetime, research_max_seconds: int
    ) -> dict[str, Timeline]:
        """`timeline` of each of a batch of calls: one query for their events, one for their
        research marks."""
        loaded = await timeline_store.load_timelines(
            self._connection, batch, research_max_seconds, now=now
        )
        return {call.call_sid: timeline for call, timeline in loaded}

    async def minutes_posted(self, call_sid: str) -> dict[str, int]:
        return await calls_store.minutes_posted(self._connection, call_sid)

    async def minutes_posted_of(self, call_sids: Sequence[str]) -> dict[str, dict[str, int]]:
        """`minutes_posted` of each of a batch of calls, in one statement."""
        return await calls_store.minutes_posted_of(self._connection, call_sids)

    async def set_minutes_posted(self, call_sid: str, agent_id: str, minutes: int) -> None:
        await calls_store.set_minutes_posted(self._connection, call_sid, agent_id, minutes)

    async def due(self, now: dt.datetime, limit: int) -> list[tuple[str, dt.datetime]]:
        """Unsettled calls whose next minute is due by `now`, the most overdue first."""
        rows = await self._connection.execute(
            select(calls.c.call_sid, calls.c.next_due_at)
            .where(calls.c.next_due_at <= now, calls.c.settled_at.is_(None))
            .order_by(calls.c.next_due_at)
            .limit(limit)
        )
        return [(row.call_sid, row.next_due_at) for row in rows]

    async def grace_over(self, cutoff: dt.datetime, limit: int) -> list[str]:
        """Connected, unwaived calls out of funds since `cutoff` or before, whose hang-up is not
        requested yet."""
        requested = exists().where(outbox.c.request_key == "call:" + calls.c.call_sid + ":hang_up")
        rows = await self._connection.scalars(
            select(calls.c.call_sid)
            .where(
                calls.c.exhausted_at <= cutoff,
                calls.c.status == CallStatus.CONNECTED,
                calls.c.waived_at.is_(None),
                ~requested,
            )
            .limit(limit)
        )
        return list(rows.all())

    async def settleable(
        self, *, ended_by: dt.datetime, research_opened_after: dt.datetime, limit: int
    ) -> list[str]:
        """Unsettled calls ended by `ended_by` with no research open (a mark left open since
        `research_opened_after` or before has run out: it no longer holds the call), the
        longest ended first."""
        open_research = exists().where(
            and_(
                research_marks.c.call_sid == calls.c.call_sid,
                research_marks.c.end_at.is_(None),
                research_marks.c.start_at > research_opened_after,
            )
        )
        rows = await self._connection.scalars(
            select(calls.c.call_sid)
            .where(
                calls.c.settled_at.is_(None),
                calls.c.ended_at <= ended_by,
                calls.c.status.in_((CallStatus.ENDED, CallStatus.REJECTED)),
                ~open_research,
            )
            .order_by(calls.c.ended_at)
            .limit(limit)
        )
        return list(rows.all())

    async def settled_in_incident(self, group: str, *, other_than: str) -> list[Record]:
        """The settled, unwaived calls of an incident group (the group is named for its first
        call), but `other_than`."""
        rows = await self._connection.execute(
            select(calls).where(
                (calls.c.incident_group == group) | (calls.c.call_sid == group),
                calls.c.call_sid != other_than,
                calls.c.settled_at.is_not(None),
                calls.c.waived_at.is_(None),
            )
        )
        return list(rows.all())


class AccountRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def lock(self, account_id: str) -> Record | None:
        """The account's row, locked until the transaction ends (PostgreSQL; SQLite's write
        transaction is exclusive already). None: no such account."""
        query = select(accounts).where(accounts.c.account_id == account_id)
        if self._connection.dialect.name == "postgresql":
            query = query.with_for_update()
        return (await self._connection.execute(query)).one_or_none()

    async def lock_many(self, account_ids: Sequence[str]) -> dict[str, Record]:
        """`lock` of each of a batch of accounts, in one statement, in account_id order (the
        lock order: two batches never wait on each other in a circle)."""
        query = select(accounts).where(accounts.c.account_id.in_(account_ids))
        if self._connection.dialect.name == "postgresql":  # byte order, as Python's sorted()
            query = query.order_by(accounts.c.account_id.collate("C")).with_for_update()
        return {row.account_id: row for row in await self._connection.execute(query)}


class LedgerRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def balances(self, books: list[str]) -> dict[str, int]:
        return await ledger_store.balances(self._connection, books)

    async def post(
        self, transaction: ledger.Transaction, now: dt.datetime
    ) -> ledger_store.PostResult:
        return await ledger_store.post(self._connection, transaction, now)

    async def open_receivable(self, account_id: str, currency: str) -> None:
        """The account's receivable book, opened if it is not yet (an owed minute needs it)."""
        await ledger_store.create_book(
            self._connection,
            ledger.receivable_book(account_id),
            unit=currency,
            kind=ledger.BookKind.RECEIVABLE,
            account_id=account_id,
            allow_negative=True,
        )

    async def allow_debt(self, account_id: str) -> None:
        await ledger_store.allow_debt(self._connection, account_id)


class CardRepository:
    """What is known of an account's card operations (`payment_operations`)."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def block_in_flight(self, account_id: str) -> bool:
        """A block (a charge) queued or sent for the account, by any of its calls."""
        operations = payment_operations.c
        return await self._any(
            operations.status.in_(IN_FLIGHT),
            operations.account_id == account_id,
            operations.kind == PaymentKind.CHARGE,
        )

    async def authorisation_in_flight(self, call_sid: str) -> bool:
        """An authorisation queued or sent for the call."""
        operations = payment_operations.c
        return await self._any(
            operations.status.in_(IN_FLIGHT),
            operations.call_sid == call_sid,
            operations.kind == PaymentKind.AUTHORIZE,
        )

    async def _any(self, *where: Any) -> bool:
        return bool(await self._connection.scalar(select(func.count()).where(*where)))

    async def decline_unresolved(self, call_sid: str, account_id: str) -> bool:
        """The call's latest block or authorisation failed, and no block or authorisation of
        the account has succeeded since that failure was recorded (a card that pays again, or
        a new card a caller gave at the gate and the gate's payment on it, resolves the
        decline), whenever that payment was made."""
        operations = payment_operations.c
        last = (
            await self._connection.execute(
                select(operations.operation_id, operations.status, operations.completed_at)
                .where(operations.call_sid == call_sid, operations.kind.in_(CARD_PURCHASE_KINDS))
                .order_by(operations.operation_id.desc())
                .limit(1)
            )
        ).one_or_none()
        if last is None or last.status != PaymentStatus.FAILED:
            return False
        succeeded_since = await self._connection.scalar(
            select(
                exists().where(
                    operations.account_id == account_id,
                    operations.kind.in_(CARD_PURCHASE_KINDS),
                    operations.status == PaymentStatus.SUCCEEDED,
                    or_(  # recorded after the failure (the same instant: made after it)
                        operations.completed_at > last.completed_at,
                        and_(
                            operations.completed_at == last.completed_at,
                            operations.operation_id > last.operation_id,
                        ),
                    ),
                )
            )
        )
        return not succeeded_since

    async def operation_status(self, operation_key: str) -> str | None:
        return await payments_store.operation_status(self._connection, operation_key)

    async def hold_left_minor(self, call_sid: str, currency: str) -> int:
        """Authorise mode: the money the call's succeeded authorisations still hold, less the
        money of the minutes paid from them (net of reversals)."""
        authorised = await self._connection.scalar(
            select(func.coalesce(func.sum(payment_operations.c.amount_minor), 0)).where(
                payment_operations.c.call_sid == call_sid,
                payment_operations.c.kind == PaymentKind.AUTHORIZE,
                payment_operations.c.status == PaymentStatus.SUCCEEDED,
            )
        )
        if not authorised:
            return 0
        return int(authorised) - await card_money_used_minor(self._connection, call_sid, currency)


async def card_money_used_minor(connection: AsyncConnection, call_sid: str, currency: str) -> int:
    """Money of the call's minutes paid by card authorisation, less what was given back: the
    call's net movement on the card receipts book from minute postings and their reversals."""
    original = ledger_transactions.alias("original")
    minute_card = (ledger_transactions.c.kind == ledger.TransactionKind.MINUTE_CARD) | (
        original.c.kind == ledger.TransactionKind.MINUTE_CARD
    )
    moved = await connection.scalar(
        select(func.coalesce(func.sum(ledger_postings.c.amount), 0))
        .join(
            ledger_transactions,
            ledger_transactions.c.transaction_id == ledger_postings.c.transaction_id,
        )
        .outerjoin(original, original.c.idempotency_key == ledger_transactions.c.reverses_key)
        .where(
            ledger_transactions.c.call_sid == call_sid,
            minute_card,
            ledger_postings.c.book == ledger.card_receipts_book(currency),
        )
    )
    return -int(moved or 0)


class OutboxRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def enqueue(
        self,
        kind: str,
        request_key: str,
        *,
        call_sid: str,
        target_sid: str,
        argument: str,
        now: dt.datetime,
    ) -> bool:
        """Record a request to Twilio once (sent later by the outbox); True if it is new."""
        return await outbox_store.record_request(
            self._connection,
            request_key=request_key,
            kind=kind,
            call_sid=call_sid,
            target_sid=target_sid,
            argument=argument,
            now=now,
        )


class Repositories:
    """Every repository, on one transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.calls = CallRepository(connection)
        self.accounts = AccountRepository(connection)
        self.ledger = LedgerRepository(connection)
        self.cards = CardRepository(connection)
        self.outbox = OutboxRepository(connection)


RepositoriesFactory = Callable[[AsyncConnection], Repositories]
