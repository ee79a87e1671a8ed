"""Card payment operations (`payment_operations`), and the card on file they are paid with.

One row per operation sent, or to be sent, to the gateway, under its deterministic key (the
gateway's idempotency key too). Its status only moves forward: `queued` -> `sent` ->
`succeeded` or `failed`; each move is one conditional UPDATE whose row count says whether this
caller made it, so an operation completes once however many workers race to complete it.
meterd/services/payments.py says how the statuses are used.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from sqlalchemy import func, select, update

from meterd.store.schema import accounts, payment_operations
from meterd.store.sql import insert_ignoring_conflict
from meterd.store.transaction import Record, Transaction


class PaymentStatus(StrEnum):
    """Where an operation is. `queued`: decided, not sent. `sent`: handed to the gateway, its
    answer not recorded yet. `succeeded` / `failed`: final."""

    QUEUED = "queued"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PaymentKind(StrEnum):
    """What an operation asks of the gateway. `charge`: a block of minutes bought (block mode).
    `authorize`: a hold placed (authorise mode). `incident`: a per-incident charge. `capture`,
    `release`, `refund`: what follows one of those (its key in `related_key`)."""

    CHARGE = "charge"
    AUTHORIZE = "authorize"
    INCIDENT = "incident"
    CAPTURE = "capture"
    RELEASE = "release"
    REFUND = "refund"


IN_FLIGHT = (PaymentStatus.QUEUED, PaymentStatus.SENT)
"""Not final: the operation may still reach, or have reached, the gateway."""


async def save_card_on_file(
    connection: Transaction,
    account_id: str,
    *,
    customer: str,
    payment_method: str,
    brand: str,
    last4: str,
) -> None:
    """The account's card on file becomes this one (the gateway's customer and payment method)."""
    await connection.execute(
        update(accounts)
        .where(accounts.c.account_id == account_id)
        .values(
            card_customer=customer,
            card_on_file=payment_method,
            card_brand=brand,
            card_last4=last4,
        )
    )


async def paying_account(connection: Transaction, account_id: str) -> Record:
    """The account an operation is of (it exists: the operation's foreign key)."""
    return (
        await connection.execute(select(accounts).where(accounts.c.account_id == account_id))
    ).one()


async def insert_operation(
    connection: Transaction,
    *,
    key: str,
    kind: PaymentKind,
    account_id: str,
    call_sid: str | None,
    amount_minor: int,
    currency: str,
    minutes: int,
    related_key: str | None,
    status: PaymentStatus,
    created_at: dt.datetime,
) -> None:
    """Record an operation under its key, once: nothing happens if the key is recorded already."""
    await connection.execute(
        insert_ignoring_conflict(
            connection,
            payment_operations,
            {
                "operation_key": key,
                "kind": kind,
                "account_id": account_id,
                "call_sid": call_sid,
                "amount_minor": amount_minor,
                "currency": currency,
                "minutes": minutes,
                "related_key": related_key,
                "status": status,
                "gateway_reference": None,
                "error": None,
                "created_at": created_at,
                "completed_at": None,
            },
            ["operation_key"],
        )
    )


async def get_operation(connection: Transaction, key: str) -> Record:
    """The operation recorded under `key` (which must exist)."""
    return (
        await connection.execute(
            select(payment_operations).where(payment_operations.c.operation_key == key)
        )
    ).one()


async def operation_status(connection: Transaction, key: str) -> PaymentStatus | None:
    """The operation's status, or None if nothing is recorded under `key`."""
    status = await connection.scalar(
        select(payment_operations.c.status).where(payment_operations.c.operation_key == key)
    )
    return None if status is None else PaymentStatus(status)


async def gateway_reference(connection: Transaction, key: str | None) -> str | None:
    """The gateway's reference for the operation under `key` (None until it succeeded)."""
    reference: str | None = await connection.scalar(
        select(payment_operations.c.gateway_reference).where(
            payment_operations.c.operation_key == key
        )
    )
    return reference


async def count_operations(connection: Transaction, call_sid: str, kind: PaymentKind) -> int:
    """How many operations of this kind the call has (in any status)."""
    count = await connection.scalar(
        select(func.count())
        .select_from(payment_operations)
        .where(payment_operations.c.call_sid == call_sid, payment_operations.c.kind == kind)
    )
    return count or 0


async def call_operations(
    connection: Transaction,
    call_sid: str,
    kinds: tuple[PaymentKind, ...],
    statuses: tuple[PaymentStatus, ...],
) -> list[Record]:
    """The call's operations of these kinds in these statuses, oldest first."""
    return list(
        (
            await connection.execute(
                select(payment_operations)
                .where(
                    payment_operations.c.call_sid == call_sid,
                    payment_operations.c.kind.in_(kinds),
                    payment_operations.c.status.in_(statuses),
                )
                .order_by(payment_operations.c.operation_id)
            )
        ).all()
    )


async def last_purchase(connection: Transaction, call_sid: str) -> Record | None:
    """The call's latest block or authorisation, in any status."""
    return (
        await connection.execute(
            select(payment_operations)
            .where(
                payment_operations.c.call_sid == call_sid,
                payment_operations.c.kind.in_((PaymentKind.CHARGE, PaymentKind.AUTHORIZE)),
            )
            .order_by(payment_operations.c.operation_id.desc())
            .limit(1)
        )
    ).one_or_none()


async def queued_keys(connection: Transaction, limit: int) -> list[str]:
    """The keys of the oldest `limit` operations waiting to be sent."""
    return list(
        (
            await connection.scalars(
                select(payment_operations.c.operation_key)
                .where(payment_operations.c.status == PaymentStatus.QUEUED)
                .order_by(payment_operations.c.operation_id)
                .limit(limit)
            )
        ).all()
    )


async def sent_before(connection: Transaction, cutoff: dt.datetime, limit: int) -> list[Record]:
    """The oldest `limit` operations sent, created at or before `cutoff`, still unanswered."""
    return list(
        (
            await connection.execute(
                select(payment_operations)
                .where(
                    payment_operations.c.status == PaymentStatus.SENT,
                    payment_operations.c.created_at <= cutoff,
                )
                .order_by(payment_operations.c.operation_id)
                .limit(limit)
            )
        ).all()
    )


async def claim_queued(connection: Transaction, key: str) -> bool:
    """`queued` -> `sent`: True if this caller claimed the operation for sending."""
    claimed = await connection.execute(
        update(payment_operations)
        .where(
            payment_operations.c.operation_key == key,
            payment_operations.c.status == PaymentStatus.QUEUED,
        )
        .values(status=PaymentStatus.SENT)
    )
    return claimed.rowcount == 1


async def mark_succeeded(
    connection: Transaction, key: str, *, reference: str, completed_at: dt.datetime
) -> bool:
    """In flight -> `succeeded`, with the gateway's reference: True if this caller moved it
    (False: it was final already)."""
    changed = await connection.execute(
        update(payment_operations)
        .where(
            payment_operations.c.operation_key == key,
            payment_operations.c.status.in_(IN_FLIGHT),
        )
        .values(
            status=PaymentStatus.SUCCEEDED,
            gateway_reference=reference,
            completed_at=completed_at,
        )
    )
    return changed.rowcount == 1


async def mark_failed(
    connection: Transaction,
    key: str,
    *,
    error: str,
    completed_at: dt.datetime,
    from_statuses: tuple[PaymentStatus, ...] = IN_FLIGHT,
) -> bool:
    """One of `from_statuses` -> `failed`, with why: True if this caller moved it."""
    changed = await connection.execute(
        update(payment_operations)
        .where(
            payment_operations.c.operation_key == key,
            payment_operations.c.status.in_(from_statuses),
        )
        .values(status=PaymentStatus.FAILED, error=error, completed_at=completed_at)
    )
    return changed.rowcount == 1
