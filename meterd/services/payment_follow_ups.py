"""What follows a call's card payments: capture and release at settlement, and giving back.

Each follow-up (a capture, a release, a refund) is queued under a key derived from the payment
it follows (`<key>:capture`, `<key>:release`, `<key>:refund`), in the caller's transaction, so
deciding it twice queues it once; the payments job (meterd/services/payments.py) sends it.
"""

from __future__ import annotations

from meterd.clock import Clock
from meterd.core import ledger, rating
from meterd.services.funding import card_money_used_minor, owes_nothing, reverse_charges
from meterd.store import ledger_store, payments_store
from meterd.store.payments_store import PaymentKind, PaymentStatus
from meterd.store.transaction import Record, Transaction


async def queue_settlement(connection: Transaction, call: Record, *, clock: Clock) -> None:
    """At settlement: capture what each authorisation paid for (in order) and release the
    rest. A call that owes nothing (waived, never connected) has everything given back."""
    if owes_nothing(call):
        await give_back(connection, call, clock=clock)
        return
    holds = await payments_store.call_operations(
        connection, call.call_sid, (PaymentKind.AUTHORIZE,), (PaymentStatus.SUCCEEDED,)
    )
    if not holds:
        return
    used_minor = await card_money_used_minor(connection, call.call_sid, holds[0].currency)
    for hold in holds:
        take = min(used_minor, hold.amount_minor)
        used_minor -= take
        kind, amount = (PaymentKind.CAPTURE, take) if take else (PaymentKind.RELEASE, 0)
        key = f"{hold.operation_key}:{kind}"
        await _queue(connection, key, kind, hold, amount, clock=clock)


async def give_back(connection: Transaction, call: Record, *, clock: Clock) -> int:
    """Leave the account as if the call's charges had never been made (a waiver, or a call
    that never connected). Idempotent; called again whenever one of the call's card
    payments completes later. In the caller's transaction, under the account's lock.

    - every charge of the call is reversed in the ledger (minutes to the bank, money to
      the deposit, off the receivable or back to the card's receipts);
    - card payments not sent yet are cancelled (a queued capture becomes a release);
    - a block bought on the call is refunded for the minutes of it the bank still holds
      (all of them, unless another call of the account used some), the money pro rata,
      rounded up: never against the customer;
    - an authorisation not captured is released; a capture or a card-paid incident is
      refunded in full (their ledger money came back with the reversals above).
    Payments still in flight are given back when they complete
    (`PaymentService.complete`). Returns how many ledger charges were reversed now."""
    reversed_count = 0
    if call.waived_at is not None:
        reversed_count = await reverse_charges(connection, call.call_sid, clock())
    for pending in await payments_store.call_operations(
        connection,
        call.call_sid,
        (PaymentKind.CHARGE, PaymentKind.AUTHORIZE, PaymentKind.INCIDENT, PaymentKind.CAPTURE),
        (PaymentStatus.QUEUED,),
    ):
        await _cancel(connection, pending.operation_key, clock=clock)
    captured_or_released = {
        operation.related_key
        for operation in await payments_store.call_operations(
            connection,
            call.call_sid,
            (PaymentKind.CAPTURE, PaymentKind.RELEASE),
            (PaymentStatus.QUEUED, PaymentStatus.SENT, PaymentStatus.SUCCEEDED),
        )
    }
    for operation in await payments_store.call_operations(
        connection,
        call.call_sid,
        (PaymentKind.CHARGE, PaymentKind.AUTHORIZE, PaymentKind.CAPTURE, PaymentKind.INCIDENT),
        (PaymentStatus.SUCCEEDED,),
    ):
        if operation.kind == PaymentKind.AUTHORIZE:
            if operation.operation_key not in captured_or_released:
                key = f"{operation.operation_key}:release"
                await _queue(connection, key, PaymentKind.RELEASE, operation, 0, clock=clock)
        elif operation.kind == PaymentKind.CHARGE:
            await _refund_block(connection, operation, clock=clock)
        else:  # a capture (refunded on its authorisation's intent) or an incident
            await _queue(
                connection,
                f"{operation.operation_key}:refund",
                PaymentKind.REFUND,
                operation,
                operation.amount_minor,
                related_key=operation.related_key
                if operation.kind == PaymentKind.CAPTURE
                else operation.operation_key,
                clock=clock,
            )
    return reversed_count


async def _refund_block(connection: Transaction, block: Record, *, clock: Clock) -> None:
    refund_key = f"{block.operation_key}:refund"
    if await ledger_store.load_transaction(connection, f"payment:{refund_key}"):
        return
    bank_book = ledger.bank_book(block.account_id)
    bank = (await ledger_store.balances(connection, [bank_book])).get(bank_book, 0)
    minutes = min(block.minutes, max(bank, 0))
    amount = rating.block_refund_minor(block.amount_minor, block.minutes, minutes)
    if minutes == 0 and amount == 0:
        return
    await ledger_store.post(
        connection,
        ledger.card_refund(
            refund_key,
            account_id=block.account_id,
            call_sid=block.call_sid,
            minutes=minutes,
            currency=block.currency,
            amount_minor=amount,
        ),
        clock(),
    )
    if amount:
        await _queue(connection, refund_key, PaymentKind.REFUND, block, amount, clock=clock)


async def _cancel(connection: Transaction, key: str, *, clock: Clock) -> None:
    """A payment not sent yet that is no longer wanted: it never reaches the gateway. A
    capture cancelled becomes the release of its authorisation."""
    changed = await payments_store.mark_failed(
        connection,
        key,
        error="cancelled: nothing is owed",
        completed_at=clock(),
        from_statuses=(PaymentStatus.QUEUED,),
    )
    operation = await payments_store.get_operation(connection, key)
    if changed and operation.kind == PaymentKind.CAPTURE:
        hold = await payments_store.get_operation(connection, operation.related_key)
        key = f"{hold.operation_key}:release"
        await _queue(connection, key, PaymentKind.RELEASE, hold, 0, clock=clock)


async def _queue(
    connection: Transaction,
    key: str,
    kind: PaymentKind,
    of: Record,
    amount_minor: int,
    related_key: str | None = None,
    *,
    clock: Clock,
) -> None:
    """Queue the follow-up `kind` of the payment `of` (related to `related_key`, else to it)."""
    await payments_store.insert_operation(
        connection,
        key=key,
        kind=kind,
        account_id=of.account_id,
        call_sid=of.call_sid,
        amount_minor=amount_minor,
        currency=of.currency,
        minutes=0,
        related_key=related_key or of.operation_key,
        status=PaymentStatus.QUEUED,
        created_at=clock(),
    )
