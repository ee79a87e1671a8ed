"""The nightly usage's queries: its runs (`usage_runs`, see `meterd.store.usage_schema`) and what
a day's report reads of the ledger, the accounts and the calls.

The report reads in one transaction (`begin_report_read`: on PostgreSQL `REPEATABLE READ, READ
ONLY`, so every query sees the same ledger). The day's postings are read once
(`day_postings_query`), summed in the database per call, account, kind and book, in call-sid
order (byte order, so SQLite and PostgreSQL agree); the balances come from `ledger_books` less
what was posted since the day's end (`customer_book_balances`), so nothing before the day is
re-read.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    Row,
    and_,
    case,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.core.ledger import TransactionKind
from meterd.core.usage.movements import WAIVER_MEMO
from meterd.store.calls_store import CallStatus
from meterd.store.schema import (
    accounts,
    calls,
    ledger_books,
    ledger_postings,
    ledger_transactions,
)
from meterd.store.sql import insert_ignoring_conflict
from meterd.store.usage_schema import usage_runs

# rows fetched from the server-side cursor of `day_postings_query` at a time
STREAM_ROWS = 5000


class RunStatus(StrEnum):
    BUILDING = "building"
    PUBLISHED = "published"
    REFUSED = "refused"
    FAILED = "failed"


# --- runs ----------------------------------------------------------------------------------------


async def run_of(connection: AsyncConnection, day: dt.date) -> Row[Any] | None:
    return (
        await connection.execute(select(usage_runs).where(usage_runs.c.business_day == day))
    ).one_or_none()


async def earliest_run_day(connection: AsyncConnection) -> dt.date | None:
    return cast(
        dt.date | None, await connection.scalar(select(func.min(usage_runs.c.business_day)))
    )


async def earliest_posting_at(connection: AsyncConnection) -> dt.datetime | None:
    return cast(
        dt.datetime | None,
        await connection.scalar(select(func.min(ledger_transactions.c.posted_at))),
    )


async def published_days(
    connection: AsyncConnection, first: dt.date, last: dt.date
) -> set[dt.date]:
    return set(
        (
            await connection.scalars(
                select(usage_runs.c.business_day).where(
                    usage_runs.c.business_day.between(first, last),
                    usage_runs.c.status == RunStatus.PUBLISHED.value,
                )
            )
        ).all()
    )


async def insert_claim(
    connection: AsyncConnection, day: dt.date, instance: str, now: dt.datetime
) -> bool:
    """Claim a day that has no run yet: False if it has one."""
    inserted = await connection.scalar(
        insert_ignoring_conflict(
            connection,
            usage_runs,
            {
                "business_day": day,
                "status": RunStatus.BUILDING.value,
                "claimed_by": instance,
                "claimed_at": now,
                "created_at": now,
            },
            ["business_day"],
        ).returning(usage_runs.c.business_day)
    )
    return inserted is not None


async def lock_run(connection: AsyncConnection, day: dt.date) -> Row[Any]:
    """The day's run, locked until the transaction ends (on PostgreSQL; SQLite's write
    transaction is exclusive already)."""
    query = select(usage_runs).where(usage_runs.c.business_day == day)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    return (await connection.execute(query)).one()


async def take_claim(
    connection: AsyncConnection, day: dt.date, instance: str, now: dt.datetime
) -> None:
    """Claim a day whose run exists (locked by `lock_run`), whatever its status."""
    await connection.execute(
        update(usage_runs)
        .where(usage_runs.c.business_day == day)
        .values(
            status=RunStatus.BUILDING.value,
            claimed_by=instance,
            claimed_at=now,
            detail=None,
        )
    )


async def update_claimed_run(
    connection: AsyncConnection, day: dt.date, instance: str, **values: Any
) -> bool:
    """Change the day's run if it is still being built under `instance`'s claim: False if the
    claim was taken over."""
    updated = await connection.execute(
        update(usage_runs)
        .where(
            usage_runs.c.business_day == day,
            usage_runs.c.claimed_by == instance,
            usage_runs.c.status == RunStatus.BUILDING.value,
        )
        .values(**values)
    )
    return updated.rowcount == 1


# --- what the report reads -----------------------------------------------------------------------


async def begin_report_read(connection: AsyncConnection) -> None:
    """Make the read transaction one snapshot of the ledger (on PostgreSQL)."""
    if connection.dialect.name == "postgresql":
        await connection.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        # The day's aggregate is estimated big enough to be JIT-compiled, which costs more than
        # it saves (about 1 s); for this transaction only.
        await connection.execute(text("SET LOCAL jit = off"))


async def account_currencies(
    connection: AsyncConnection,
) -> dict[str, tuple[str, dt.datetime]]:
    """Every account: (currency, created at)."""
    rows = await connection.execute(
        select(accounts.c.account_id, accounts.c.currency, accounts.c.created_at)
    )
    return {row.account_id: (row.currency, row.created_at) for row in rows}


async def customer_book_balances(
    connection: AsyncConnection, end: dt.datetime
) -> list[tuple[str, str, str, int, int]]:
    """Every customer book: (account, kind, book, balance now, what was posted to it since the
    day's end). Less the day's own postings, the balance at the day's start; so nothing before
    the day is re-read."""
    t, p, b = ledger_transactions, ledger_postings, ledger_books
    since = (
        select(p.c.book.label("book"), func.sum(p.c.amount).label("since_end"))
        .select_from(p.join(t, t.c.transaction_id == p.c.transaction_id))
        .where(t.c.posted_at >= end)
        .group_by(p.c.book)
        .subquery()
    )
    rows = await connection.execute(
        select(
            b.c.account_id,
            b.c.kind,
            b.c.book,
            b.c.balance,
            func.coalesce(since.c.since_end, 0).label("since_end"),
        )
        .select_from(b.outerjoin(since, since.c.book == b.c.book))
        .where(b.c.account_id.is_not(None))
    )
    return [
        (row.account_id, row.kind, row.book, int(row.balance), int(row.since_end)) for row in rows
    ]


def _constant(sql: str) -> Any:
    # Constants inlined, never bound: a grouped expression must render the same in SELECT and
    # GROUP BY, which bound parameters ($1 vs $5) would not on PostgreSQL.
    return literal_column(sql)


def _waiver_memo() -> Any:
    t = ledger_transactions
    return case(
        (
            and_(
                t.c.kind == _constant(f"'{TransactionKind.REVERSAL.value}'"),
                t.c.memo == _constant(f"'{WAIVER_MEMO}'"),
            ),
            _constant("1"),
        ),
        else_=_constant("0"),
    )


def _grouped_postings(start: dt.datetime, end: dt.datetime, by: Sequence[Any]) -> Any:
    """The day's postings summed per (`by`..., kind, reversed kind, waiver, book, unit)."""
    t, p = ledger_transactions, ledger_postings
    reversed_ = ledger_transactions.alias("reversed")
    waiver_memo = _waiver_memo()
    return (
        select(
            *by,
            t.c.kind.label("kind"),
            reversed_.c.kind.label("reversed_kind"),
            waiver_memo.label("waiver_memo"),
            p.c.book.label("book"),
            p.c.unit.label("unit"),
            func.sum(p.c.amount).label("amount"),
            func.sum(case((p.c.amount > _constant("0"), p.c.amount), else_=_constant("0"))).label(
                "positive"
            ),
            func.count().label("postings"),
        )
        .select_from(
            t.join(p, p.c.transaction_id == t.c.transaction_id).outerjoin(
                reversed_, reversed_.c.idempotency_key == t.c.reverses_key
            )
        )
        .where(t.c.posted_at >= start, t.c.posted_at < end)
        .group_by(*by, t.c.kind, reversed_.c.kind, waiver_memo, p.c.book, p.c.unit)
    )


def day_postings_query(connection: AsyncConnection, start: dt.datetime, end: dt.datetime) -> Any:
    """The day's postings grouped per (call sid, account, kind, reversed kind, waiver, book,
    unit), with a row of no amounts (kind NULL) for each call settled or waived on the day, in
    call-sid order: entries without a call (call sid NULL) too, as they count for the accounts
    and books. To stream (`STREAM_ROWS` at a time)."""
    t = ledger_transactions
    charges = _grouped_postings(
        start, end, [t.c.call_sid.label("call_sid"), t.c.account_id.label("tx_account_id")]
    )
    # calls settled or waived on the day, with or without entries: one row each, no amounts
    markers = select(
        calls.c.call_sid.label("call_sid"),
        calls.c.account_id.label("tx_account_id"),
        null().label("kind"),
        null().label("reversed_kind"),
        _constant("0").label("waiver_memo"),
        null().label("book"),
        null().label("unit"),
        _constant("0").label("amount"),
        _constant("0").label("positive"),
        _constant("0").label("postings"),
    ).where(
        calls.c.account_id.is_not(None),
        or_(
            and_(
                calls.c.settled_at >= start,
                calls.c.settled_at < end,
                calls.c.status == CallStatus.ENDED,
            ),
            and_(calls.c.waived_at >= start, calls.c.waived_at < end),
        ),
    )
    rows = union_all(charges, markers).subquery("day_calls")
    order: Any = rows.c.call_sid
    if connection.dialect.name == "postgresql":
        order = order.collate("C")  # byte order, as SQLite's BINARY and Python's own
    # The calls' own columns are read once per batch of calls (`calls_of`), not repeated on
    # each of a call's grouped rows.
    return select(rows).order_by(order).execution_options(yield_per=STREAM_ROWS)


async def calls_of(connection: AsyncConnection, call_sids: Sequence[str]) -> dict[str, Any]:
    """The `calls` columns the report reads, for a batch of calls (one query)."""
    rows = await connection.execute(
        select(
            calls.c.call_sid,
            calls.c.account_id,
            calls.c.plan,
            calls.c.started_at,
            calls.c.ended_at,
            calls.c.settled_at,
            calls.c.waived_at,
            calls.c.waiver_reason,
            calls.c.closed_by_sweeper,
            calls.c.direction,
        ).where(calls.c.call_sid.in_(call_sids))
    )
    return {row.call_sid: row for row in rows}
