"""Card payments, exactly once with an outside party.

Every gateway operation is first recorded in `payment_operations` under a deterministic key
(`call:<sid>:block:<n>`, `call:<sid>:auth:<n>`, `...:capture`, `...:release`, `...:refund`),
committed, then sent to the gateway with that key as its idempotency key (and in its metadata);
its outcome is recorded after, in the same transaction as its ledger postings. Statuses:

- `queued`: decided (by metering, settlement or a waiver), not sent yet; `send_queued` sends it.
- `sent`: handed to the gateway; the answer may have been lost to a crash or a timeout.
  `resolve_sent` looks such an operation up at the gateway by its key once it is older than
  `resolve_after_seconds` (longer than any request can still be in flight) and completes it
  as the gateway says, or fails it if the gateway never saw it. So a crash between our commit
  and the gateway's answer neither loses nor repeats a charge.
- `succeeded` / `failed`: final.

Block mode: a charge of `block_price` buys `block_minutes` into the bank (`card_block`).
Authorise mode: a hold of `authorize_minutes` x rate; minutes are then paid from it
(`minute_card`), and settlement captures what was used and releases the rest.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.adapters.stripe_gateway import (
    CardDeclined,
    CardOnFile,
    GatewayError,
    GatewayResult,
    GatewayUnavailable,
    PaymentGateway,
)
from meterd.clock import Clock
from meterd.core import ledger, rating
from meterd.core.ledger import BookKind
from meterd.logs import get_logger
from meterd.services.errors import InvariantBroken
from meterd.services.funding import (
    card_money_used_minor,
    lock_account,
    owes_nothing,
    reverse_charges,
)
from meterd.services.rates import RateBook, RateKind
from meterd.store import calls_store, ledger_store
from meterd.store.database import Database
from meterd.store.schema import accounts, payment_operations
from meterd.store.sql import insert_ignoring_conflict

log = get_logger("meterd.payments")

BATCH_MAX = 100


@dataclass(frozen=True)
class PaymentSettings:
    card_mode: str  # block or authorize
    block_minutes: int
    authorize_minutes: int
    resolve_after_seconds: int = 60  # longer than any request can still be in flight


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""  # declined, unavailable, error, no_gateway


def card_of(account: Row[Any]) -> CardOnFile | None:
    if not account.card_customer or not account.card_on_file:
        return None
    return CardOnFile(
        account.card_customer,
        account.card_on_file,
        account.card_brand or "",
        account.card_last4 or "",
    )


class PaymentService:
    def __init__(
        self,
        database: Database,
        gateway: PaymentGateway | None,
        settings: PaymentSettings,
        clock: Clock,
        rates: RateBook,
    ) -> None:
        self._database = database
        self._gateway = gateway
        self._settings = settings
        self._clock = clock
        self._rates = rates

    @property
    def available(self) -> bool:
        return self._gateway is not None

    def _require_gateway(self) -> PaymentGateway:
        """The gateway, on a path only reached when card payments are on."""
        if self._gateway is None:
            raise InvariantBroken("a card operation without a card gateway configured")
        return self._gateway

    # --- the gate: a caller waiting on the line ---------------------------------------------

    async def save_card(self, account_id: str, token: str) -> Outcome:
        """Tokenised by <Pay>: make it the account's card on file (token, brand, last four)."""
        if self._gateway is None:
            return Outcome(False, "no_gateway")
        try:
            card = await self._gateway.save_card(token)
        except CardDeclined:
            return Outcome(False, "declined")
        except GatewayUnavailable:
            return Outcome(False, "unavailable")
        except GatewayError:
            return Outcome(False, "error")
        async with self._database.write() as connection:
            await connection.execute(
                update(accounts)
                .where(accounts.c.account_id == account_id)
                .values(
                    card_customer=card.customer,
                    card_on_file=card.payment_method,
                    card_brand=card.brand,
                    card_last4=card.last4,
                )
            )
        log.info("card saved", account_id=account_id, brand=card.brand, last4=card.last4)
        return Outcome(True)

    async def pay_for_call(self, call_sid: str, account_id: str) -> Outcome:
        """Charge a block (or place an authorisation) on the card on file, now, for a caller
        waiting to be connected. Succeeds only if the gateway said yes.

        One gate per call, at most one charge: while the call's last gate payment is in flight
        (a slow gateway, or an answer lost to a timeout), a retry asks the gateway about that
        payment by its key instead of charging again; a new payment is made only once the last
        one is known to have failed."""
        if self._gateway is None:
            return Outcome(False, "no_gateway")
        async with self._database.write() as connection:
            await calls_store.get_call(connection, call_sid, for_update=True)
            account = await lock_account(connection, account_id)
            if card_of(account) is None:
                return Outcome(False, "no_card")
            last = await _last_purchase(connection, call_sid)
            if last is not None and last.status == "succeeded":
                return Outcome(True)  # paid before: a retried webhook
            if last is not None and last.status in ("queued", "sent"):
                in_flight = last
            else:
                in_flight = None
                key = await self._record(connection, account, call_sid, status="sent")
        if in_flight is not None:
            return await self._resolve_gate_payment(in_flight)
        return await self._send(key)

    async def _resolve_gate_payment(self, operation: Row[Any]) -> Outcome:
        """A gate payment still in flight: the gateway's word on it, by its key."""
        gateway = self._require_gateway()
        try:
            found = await gateway.find(operation.operation_key)
        except GatewayError:
            return Outcome(False, "unavailable")
        wanted = "requires_capture" if operation.kind == "authorize" else "succeeded"
        if found is not None and found.status in (wanted, "succeeded"):
            await self.complete(operation.operation_key, found)
            return Outcome(True)
        age = self._clock() - operation.created_at
        if age < dt.timedelta(seconds=self._settings.resolve_after_seconds):
            return Outcome(False, "unavailable")  # may still be on its way: never charge twice
        await self._fail(
            operation.operation_key,
            f"not completed at the gateway ({found.status if found else 'never received'})",
        )
        return Outcome(False, "unavailable")

    async def operation_status(self, connection: AsyncConnection, key: str) -> str | None:
        return await connection.scalar(
            select(payment_operations.c.status).where(payment_operations.c.operation_key == key)
        )

    async def queue_top_up(
        self, connection: AsyncConnection, account: Row[Any], call_sid: str
    ) -> None:
        """The next block (or authorisation), decided by the funding authority, sent by the
        payments job."""
        await self._record(connection, account, call_sid, status="queued")
        log.info("funds running out: buying the next card payment", call_sid=call_sid)

    async def queue_incident(
        self,
        connection: AsyncConnection,
        account: Row[Any],
        call_sid: str,
        key: str,
        amount_minor: int,
    ) -> None:
        """A per-incident charge the deposit cannot pay, to the card on file (decided by the
        funding authority)."""
        await connection.execute(
            insert_ignoring_conflict(
                connection,
                payment_operations,
                {
                    "operation_key": key,
                    "kind": "incident",
                    "account_id": account.account_id,
                    "call_sid": call_sid,
                    "amount_minor": amount_minor,
                    "currency": account.currency,
                    "minutes": 0,
                    "related_key": None,
                    "status": "queued",
                    "gateway_reference": None,
                    "error": None,
                    "created_at": self._clock(),
                    "completed_at": None,
                },
                ["operation_key"],
            )
        )

    async def _record(
        self, connection: AsyncConnection, account: Row[Any], call_sid: str, *, status: str
    ) -> str:
        block = self._settings.card_mode == "block"
        kind, word = ("charge", "block") if block else ("authorize", "auth")
        now = self._clock()
        count = await connection.scalar(
            select(func.count())
            .select_from(payment_operations)
            .where(payment_operations.c.call_sid == call_sid, payment_operations.c.kind == kind)
        )
        key = f"call:{call_sid}:{word}:{(count or 0) + 1}"
        if block:
            minutes = self._settings.block_minutes
            amount = await self._rates.rate_at(connection, RateKind.BLOCK, account.currency, now)
        else:
            minutes = self._settings.authorize_minutes
            amount = minutes * await self._rates.rate_at(
                connection, RateKind.PER_AGENT_MINUTE, account.currency, now
            )
        await connection.execute(
            insert_ignoring_conflict(
                connection,
                payment_operations,
                {
                    "operation_key": key,
                    "kind": kind,
                    "account_id": account.account_id,
                    "call_sid": call_sid,
                    "amount_minor": amount,
                    "currency": account.currency,
                    "minutes": minutes,
                    "related_key": None,
                    "status": status,
                    "gateway_reference": None,
                    "error": None,
                    "created_at": now,
                    "completed_at": None,
                },
                ["operation_key"],
            )
        )
        return key

    # --- sending and completing -------------------------------------------------------------

    async def _send(self, key: str) -> Outcome:
        gateway = self._require_gateway()
        async with self._database.read() as connection:
            operation = await _operation(connection, key)
            account = (
                await connection.execute(
                    select(accounts).where(accounts.c.account_id == operation.account_id)
                )
            ).one()
        card = card_of(account)
        try:
            if operation.kind in ("charge", "authorize", "incident"):
                if card is None:
                    raise CardDeclined("no card on file")
                send = gateway.authorize if operation.kind == "authorize" else gateway.charge
                result = await send(key, card, operation.amount_minor, operation.currency)
            elif operation.kind == "capture":
                result = await gateway.capture(
                    key, await self._reference_of(operation.related_key), operation.amount_minor
                )
            elif operation.kind == "release":
                result = await gateway.release(key, await self._reference_of(operation.related_key))
            else:
                result = await gateway.refund(
                    key, await self._reference_of(operation.related_key), operation.amount_minor
                )
        except CardDeclined as error:
            await self._fail(key, f"declined: {error}")
            return Outcome(False, "declined")
        except GatewayUnavailable as error:
            log.warning(
                "gateway did not answer; the operation will be resolved later",
                operation_key=key,
                error=str(error),
            )
            return Outcome(False, "unavailable")
        except GatewayError as error:
            await self._fail(key, str(error))
            return Outcome(False, "error")
        await self.complete(key, result)
        return Outcome(True)

    async def complete(self, key: str, result: GatewayResult) -> None:
        """Record the gateway's yes, with its ledger postings, once. A payment that completes
        for a call that owes nothing (waived, or never connected) is given back at once."""
        async with self._database.write() as connection:
            operation, call = await _lock_operation(connection, key)
            changed = await connection.execute(
                update(payment_operations)
                .where(
                    payment_operations.c.operation_key == key,
                    payment_operations.c.status.in_(("queued", "sent")),
                )
                .values(
                    status="succeeded",
                    gateway_reference=result.reference,
                    completed_at=self._clock(),
                )
            )
            if changed.rowcount != 1:
                return  # completed before
            if operation.kind == "incident":
                await self._post_incident_of(connection, operation, "card")
            if operation.kind == "charge":
                await ledger_store.post(
                    connection,
                    ledger.card_block(
                        key,
                        account_id=operation.account_id,
                        call_sid=operation.call_sid,
                        minutes=operation.minutes,
                        currency=operation.currency,
                        amount_minor=operation.amount_minor,
                    ),
                    self._clock(),
                )
            if call is not None and owes_nothing(call):
                await self.give_back(connection, call)
        log.info(
            "payment succeeded",
            operation_key=key,
            kind=operation.kind,
            amount_minor=operation.amount_minor,
        )

    async def _fail(self, key: str, error: str) -> None:
        """Record the gateway's no (or that it never saw the payment), once. An incident the
        card did not pay is owed, unless its call owes nothing (waived)."""
        async with self._database.write() as connection:
            operation, call = await _lock_operation(connection, key)
            changed = await connection.execute(
                update(payment_operations)
                .where(
                    payment_operations.c.operation_key == key,
                    payment_operations.c.status.in_(("queued", "sent")),
                )
                .values(status="failed", error=error[:500], completed_at=self._clock())
            )
            owed = call is None or not owes_nothing(call)
            if changed.rowcount == 1 and operation.kind == "incident" and owed:
                # the card said no: the incident is owed, for finance to invoice
                await self._post_incident_of(connection, operation, "receivable")
        log.info("payment failed", operation_key=key, error=error[:200])

    async def _post_incident_of(
        self, connection: AsyncConnection, operation: Row[Any], payer: str
    ) -> None:
        """The incident a card operation was for: paid by the card, or owed if it failed."""
        await post_incident(
            connection,
            operation.operation_key,
            call_sid=operation.call_sid,
            account_id=operation.account_id,
            currency=operation.currency,
            payer=payer,
            amount_minor=operation.amount_minor,
            now=self._clock(),
        )

    async def _reference_of(self, key: str | None) -> str:
        async with self._database.read() as connection:
            reference = await connection.scalar(
                select(payment_operations.c.gateway_reference).where(
                    payment_operations.c.operation_key == key
                )
            )
        if not reference:
            raise GatewayError(f"{key} has no gateway reference")
        return str(reference)

    async def send_queued(self) -> int:
        """Send what metering, settlement and waivers queued. Returns how many were sent."""
        if self._gateway is None:
            return 0
        async with self._database.read() as connection:
            keys = (
                await connection.scalars(
                    select(payment_operations.c.operation_key)
                    .where(payment_operations.c.status == "queued")
                    .order_by(payment_operations.c.operation_id)
                    .limit(BATCH_MAX)
                )
            ).all()
        sent = 0
        for key in keys:
            async with self._database.write() as connection:  # claim it: queued -> sent
                claimed = await connection.execute(
                    update(payment_operations)
                    .where(
                        payment_operations.c.operation_key == key,
                        payment_operations.c.status == "queued",
                    )
                    .values(status="sent")
                )
            if claimed.rowcount == 1:
                await self._send(key)
                sent += 1
        return sent

    async def resolve_sent(self) -> int:
        """Operations sent but never answered (a crash, a timeout): ask the gateway."""
        if self._gateway is None:
            return 0
        cutoff = self._clock() - dt.timedelta(seconds=self._settings.resolve_after_seconds)
        async with self._database.read() as connection:
            rows = (
                await connection.execute(
                    select(payment_operations)
                    .where(
                        payment_operations.c.status == "sent",
                        payment_operations.c.created_at <= cutoff,
                    )
                    .order_by(payment_operations.c.operation_id)
                    .limit(BATCH_MAX)
                )
            ).all()
        resolved = 0
        for operation in rows:
            if operation.kind not in ("charge", "authorize", "incident"):
                await self._send(operation.operation_key)  # capture/release/refund: idempotent
                resolved += 1
                continue
            try:
                found = await self._gateway.find(operation.operation_key)
            except GatewayError as error:
                log.warning(
                    "cannot resolve a payment yet",
                    operation_key=operation.operation_key,
                    error=str(error),
                )
                continue
            wanted = "requires_capture" if operation.kind == "authorize" else "succeeded"
            if found is not None and found.status in (wanted, "succeeded"):
                await self.complete(operation.operation_key, found)
            else:
                await self._fail(
                    operation.operation_key,
                    f"not completed at the gateway ({found.status if found else 'never received'})",
                )
            resolved += 1
            log.info(
                "resolved a payment left in flight",
                operation_key=operation.operation_key,
                found=found is not None,
            )
        return resolved

    async def run(self) -> None:
        """The payments job: send what is queued, resolve what was left in flight."""
        await self.send_queued()
        await self.resolve_sent()

    # --- settlement and giving back ---------------------------------------------------------

    async def queue_settlement(self, connection: AsyncConnection, call: Row[Any]) -> None:
        """At settlement: capture what each authorisation paid for (in order) and release the
        rest. A call that owes nothing (waived, never connected) has everything given back."""
        if owes_nothing(call):
            await self.give_back(connection, call)
            return
        holds = await _operations(connection, call.call_sid, ("authorize",), ("succeeded",))
        if not holds:
            return
        used_minor = await card_money_used_minor(connection, call.call_sid, holds[0].currency)
        for hold in holds:
            take = min(used_minor, hold.amount_minor)
            used_minor -= take
            kind, amount = ("capture", take) if take else ("release", 0)
            await self._queue(connection, f"{hold.operation_key}:{kind}", kind, hold, amount)

    async def give_back(self, connection: AsyncConnection, call: Row[Any]) -> int:
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
        Payments still in flight are given back when they complete (`complete`). Returns how
        many ledger charges were reversed now."""
        reversed_count = 0
        if call.waived_at is not None:
            reversed_count = await reverse_charges(connection, call.call_sid, self._clock())
        for pending in await _operations(
            connection, call.call_sid, ("charge", "authorize", "incident", "capture"), ("queued",)
        ):
            await self._cancel(connection, pending.operation_key)
        captured_or_released = {
            operation.related_key
            for operation in await _operations(
                connection,
                call.call_sid,
                ("capture", "release"),
                ("queued", "sent", "succeeded"),
            )
        }
        for operation in await _operations(
            connection,
            call.call_sid,
            ("charge", "authorize", "capture", "incident"),
            ("succeeded",),
        ):
            if operation.kind == "authorize":
                if operation.operation_key not in captured_or_released:
                    key = f"{operation.operation_key}:release"
                    await self._queue(connection, key, "release", operation, 0)
            elif operation.kind == "charge":
                await self._refund_block(connection, operation)
            else:  # a capture (refunded on its authorisation's intent) or an incident
                await self._queue(
                    connection,
                    f"{operation.operation_key}:refund",
                    "refund",
                    operation,
                    operation.amount_minor,
                    related_key=operation.related_key
                    if operation.kind == "capture"
                    else operation.operation_key,
                )
        return reversed_count

    async def _refund_block(self, connection: AsyncConnection, block: Row[Any]) -> None:
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
            self._clock(),
        )
        if amount:
            await self._queue(connection, refund_key, "refund", block, amount)

    async def _cancel(self, connection: AsyncConnection, key: str) -> None:
        """A payment not sent yet that is no longer wanted: it never reaches the gateway. A
        capture cancelled becomes the release of its authorisation."""
        changed = await connection.execute(
            update(payment_operations)
            .where(
                payment_operations.c.operation_key == key,
                payment_operations.c.status == "queued",
            )
            .values(status="failed", error="cancelled: nothing is owed", completed_at=self._clock())
        )
        operation = await _operation(connection, key)
        if changed.rowcount == 1 and operation.kind == "capture":
            hold = await _operation(connection, operation.related_key)
            await self._queue(connection, f"{hold.operation_key}:release", "release", hold, 0)

    async def _queue(
        self,
        connection: AsyncConnection,
        key: str,
        kind: str,
        of: Row[Any],
        amount_minor: int,
        related_key: str | None = None,
    ) -> None:
        await connection.execute(
            insert_ignoring_conflict(
                connection,
                payment_operations,
                {
                    "operation_key": key,
                    "kind": kind,
                    "account_id": of.account_id,
                    "call_sid": of.call_sid,
                    "amount_minor": amount_minor,
                    "currency": of.currency,
                    "minutes": 0,
                    "related_key": related_key or of.operation_key,
                    "status": "queued",
                    "gateway_reference": None,
                    "error": None,
                    "created_at": self._clock(),
                    "completed_at": None,
                },
                ["operation_key"],
            )
        )


async def post_incident(
    connection: AsyncConnection,
    key: str,
    *,
    call_sid: str | None,
    account_id: str,
    currency: str,
    payer: str,
    amount_minor: int,
    now: dt.datetime,
) -> None:
    """Post an incident charge (opening the customer's receivable book if it is owed)."""
    if payer == "receivable":
        await ledger_store.create_book(
            connection,
            ledger.receivable_book(account_id),
            unit=currency,
            kind=BookKind.RECEIVABLE,
            account_id=account_id,
            allow_negative=True,
        )
    group, k = ledger.parse_incident_key(key)
    await ledger_store.post(
        connection,
        ledger.incident(
            group,
            k,
            call_sid=call_sid or "",
            account_id=account_id,
            currency=currency,
            payer=payer,
            amount_minor=amount_minor,
        ),
        now,
    )


async def _operation(connection: AsyncConnection, key: str) -> Row[Any]:
    return (
        await connection.execute(
            select(payment_operations).where(payment_operations.c.operation_key == key)
        )
    ).one()


async def _lock_operation(
    connection: AsyncConnection, key: str
) -> tuple[Row[Any], Row[Any] | None]:
    """A payment operation and its call, locked in the one order: the call's row, then the
    account's row (funding.py)."""
    operation = await _operation(connection, key)
    call = (
        None
        if operation.call_sid is None
        else await calls_store.get_call(connection, operation.call_sid, for_update=True)
    )
    await lock_account(connection, operation.account_id)
    return operation, call


async def _operations(
    connection: AsyncConnection, call_sid: str, kinds: tuple[str, ...], statuses: tuple[str, ...]
) -> list[Row[Any]]:
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


async def _last_purchase(connection: AsyncConnection, call_sid: str) -> Row[Any] | None:
    """The call's latest block or authorisation."""
    return (
        await connection.execute(
            select(payment_operations)
            .where(
                payment_operations.c.call_sid == call_sid,
                payment_operations.c.kind.in_(("charge", "authorize")),
            )
            .order_by(payment_operations.c.operation_id.desc())
            .limit(1)
        )
    ).one_or_none()
