"""Card payments, exactly once with an outside party.

Every gateway operation is first recorded in `payment_operations` under a deterministic key
(`call:<sid>:block:<n>`, `call:<sid>:auth:<n>`, `...:capture`, `...:release`, `...:refund`),
committed, then sent to the gateway with that key as its idempotency key (and in its metadata);
its outcome is recorded after, in the same transaction as its ledger postings. Statuses
(`PaymentStatus`, meterd/store/payments_store.py):

- `queued`: decided (by metering, settlement or a waiver), not sent yet; `send_queued` sends it.
- `sent`: handed to the gateway; the answer may have been lost to a crash or a timeout.
  `resolve_sent` looks such an operation up at the gateway by its key once it is older than
  `resolve_after_seconds` (longer than any request can still be in flight) and completes it
  as the gateway says, or fails it if the gateway never saw it. So a crash between our commit
  and the gateway's answer neither loses nor repeats a charge.
- `succeeded` / `failed`: final.

Block mode: a charge of `block_price` buys `block_minutes` into the bank (`card_block`).
Authorise mode: a hold of `authorize_minutes` x rate; minutes are then paid from it
(`minute_card`), and settlement captures what was used and releases the rest. What follows a
payment (capture, release, refund, cancelling) is decided in meterd/services/payment_follow_ups.py.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TypeGuard

from meterd.adapters.stripe_gateway import (
    CardDeclined,
    CardOnFile,
    GatewayError,
    GatewayResult,
    GatewayUnavailable,
    PaymentGateway,
)
from meterd.clock import Clock
from meterd.config import CardMode
from meterd.core import ledger
from meterd.core.ledger import BookKind
from meterd.logs import get_logger
from meterd.services import payment_follow_ups
from meterd.services.alerts import AlertService
from meterd.services.errors import InvariantBroken
from meterd.services.funding import lock_account, owes_nothing
from meterd.services.rates import RateBook, RateKind
from meterd.store import calls_store, ledger_store, payments_store
from meterd.store.database import Database
from meterd.store.payments_store import IN_FLIGHT, PaymentKind, PaymentStatus
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.payments")

BATCH_MAX = 100

CARD_CHARGES = (PaymentKind.CHARGE, PaymentKind.AUTHORIZE, PaymentKind.INCIDENT)
"""Operations that take money from the card, found at the gateway by their key; the others
(capture, release, refund) follow one of them and are simply sent again."""


@dataclass(frozen=True)
class PaymentSettings:
    card_mode: CardMode
    block_minutes: int
    authorize_minutes: int
    resolve_after_seconds: int = 60  # longer than any request can still be in flight


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""  # declined, unavailable, error, no_gateway


def card_of(account: Record) -> CardOnFile | None:
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
        alerts: AlertService | None = None,
    ) -> None:
        self._alerts = alerts
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
            await payments_store.save_card_on_file(
                connection,
                account_id,
                customer=card.customer,
                payment_method=card.payment_method,
                brand=card.brand,
                last4=card.last4,
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
            last = await payments_store.last_purchase(connection, call_sid)
            if last is not None and last.status == PaymentStatus.SUCCEEDED:
                return Outcome(True)  # paid before: a retried webhook
            if last is not None and last.status in IN_FLIGHT:
                in_flight = last
            else:
                in_flight = None
                key = await self._record(connection, account, call_sid, status=PaymentStatus.SENT)
        if in_flight is not None:
            return await self._resolve_gate_payment(in_flight)
        return await self._send(key)

    async def _resolve_gate_payment(self, operation: Record) -> Outcome:
        """A gate payment still in flight: the gateway's word on it, by its key."""
        gateway = self._require_gateway()
        try:
            found = await gateway.find(operation.operation_key)
        except GatewayError:
            return Outcome(False, "unavailable")
        if _completed_at_gateway(found, operation.kind):
            await self.complete(operation.operation_key, found)
            return Outcome(True)
        age = self._clock() - operation.created_at
        if age < dt.timedelta(seconds=self._settings.resolve_after_seconds):
            return Outcome(False, "unavailable")  # may still be on its way: never charge twice
        await self._fail(operation.operation_key, _not_completed(found))
        return Outcome(False, "unavailable")

    async def operation_status(self, connection: Transaction, key: str) -> PaymentStatus | None:
        return await payments_store.operation_status(connection, key)

    async def queue_top_up(self, connection: Transaction, account: Record, call_sid: str) -> None:
        """The next block (or authorisation), decided by the funding authority, sent by the
        payments job."""
        await self._record(connection, account, call_sid, status=PaymentStatus.QUEUED)
        log.info("funds running out: buying the next card payment", call_sid=call_sid)

    async def queue_incident(
        self,
        connection: Transaction,
        account: Record,
        call_sid: str,
        key: str,
        amount_minor: int,
    ) -> None:
        """A per-incident charge the deposit cannot pay, to the card on file (decided by the
        funding authority)."""
        await payments_store.insert_operation(
            connection,
            key=key,
            kind=PaymentKind.INCIDENT,
            account_id=account.account_id,
            call_sid=call_sid,
            amount_minor=amount_minor,
            currency=account.currency,
            minutes=0,
            related_key=None,
            status=PaymentStatus.QUEUED,
            created_at=self._clock(),
        )

    async def _record(
        self, connection: Transaction, account: Record, call_sid: str, *, status: PaymentStatus
    ) -> str:
        block = self._settings.card_mode == CardMode.BLOCK
        kind, word = (PaymentKind.CHARGE, "block") if block else (PaymentKind.AUTHORIZE, "auth")
        now = self._clock()
        count = await payments_store.count_operations(connection, call_sid, kind)
        key = f"call:{call_sid}:{word}:{count + 1}"
        if block:
            minutes = self._settings.block_minutes
            amount = await self._rates.rate_at(connection, RateKind.BLOCK, account.currency, now)
        else:
            minutes = self._settings.authorize_minutes
            amount = minutes * await self._rates.rate_at(
                connection, RateKind.PER_AGENT_MINUTE, account.currency, now
            )
        await payments_store.insert_operation(
            connection,
            key=key,
            kind=kind,
            account_id=account.account_id,
            call_sid=call_sid,
            amount_minor=amount,
            currency=account.currency,
            minutes=minutes,
            related_key=None,
            status=status,
            created_at=now,
        )
        return key

    # --- sending and completing -------------------------------------------------------------

    async def _send(self, key: str) -> Outcome:
        gateway = self._require_gateway()
        async with self._database.read() as connection:
            operation = await payments_store.get_operation(connection, key)
            account = await payments_store.paying_account(connection, operation.account_id)
        card = card_of(account)
        try:
            if operation.kind in CARD_CHARGES:
                if card is None:
                    raise CardDeclined("no card on file")
                authorize = operation.kind == PaymentKind.AUTHORIZE
                send = gateway.authorize if authorize else gateway.charge
                result = await send(key, card, operation.amount_minor, operation.currency)
            elif operation.kind == PaymentKind.CAPTURE:
                result = await gateway.capture(
                    key, await self._reference_of(operation.related_key), operation.amount_minor
                )
            elif operation.kind == PaymentKind.RELEASE:
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
        for a call that owes nothing (waived, or never connected) is given back at once. A
        block or authorisation that succeeded shows the card on file pays (a new card a caller
        gave at the gate, or one that works again): the account's open calls are looked at by
        the next tick, so one that ran out, or whose last card payment failed, buys its block or
        authorisation before its next minute rather than at its next scheduled look."""
        async with self._database.write() as connection:
            operation, call = await _lock_operation(connection, key)
            changed = await payments_store.mark_succeeded(
                connection, key, reference=result.reference, completed_at=self._clock()
            )
            if not changed:
                return  # completed before
            if operation.kind == PaymentKind.INCIDENT:
                await self._post_incident_of(connection, operation, "card")
            if operation.kind == PaymentKind.CHARGE:
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
            if self._alerts is not None:
                await self._alerts.card(connection, operation, None, self._clock())
        if operation.kind in (PaymentKind.CHARGE, PaymentKind.AUTHORIZE):
            # its own transaction: an account is never locked before its calls in one
            async with self._database.write() as connection:
                await calls_store.wake_account_calls(
                    connection, operation.account_id, self._clock()
                )
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
            changed = await payments_store.mark_failed(
                connection, key, error=error[:500], completed_at=self._clock()
            )
            owed = call is None or not owes_nothing(call)
            if changed and operation.kind == PaymentKind.INCIDENT and owed:
                # the card said no: the incident is owed, for finance to invoice
                await self._post_incident_of(connection, operation, "receivable")
            if changed and self._alerts is not None:
                await self._alerts.card(connection, operation, error, self._clock())
        log.info("payment failed", operation_key=key, error=error[:200])

    async def _post_incident_of(
        self, connection: Transaction, operation: Record, payer: str
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
            reference = await payments_store.gateway_reference(connection, key)
        if not reference:
            raise GatewayError(f"{key} has no gateway reference")
        return str(reference)

    async def send_queued(self) -> int:
        """Send what metering, settlement and waivers queued. Returns how many were sent."""
        if self._gateway is None:
            return 0
        async with self._database.read() as connection:
            keys = await payments_store.queued_keys(connection, BATCH_MAX)
        sent = 0
        for key in keys:
            async with self._database.write() as connection:  # claim it: queued -> sent
                claimed = await payments_store.claim_queued(connection, key)
            if claimed:
                await self._send(key)
                sent += 1
        return sent

    async def resolve_sent(self) -> int:
        """Operations sent but never answered (a crash, a timeout): ask the gateway."""
        if self._gateway is None:
            return 0
        cutoff = self._clock() - dt.timedelta(seconds=self._settings.resolve_after_seconds)
        async with self._database.read() as connection:
            rows = await payments_store.sent_before(connection, cutoff, BATCH_MAX)
        resolved = 0
        for operation in rows:
            if operation.kind not in CARD_CHARGES:
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
            if _completed_at_gateway(found, operation.kind):
                await self.complete(operation.operation_key, found)
            else:
                await self._fail(operation.operation_key, _not_completed(found))
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

    # --- settlement and giving back (meterd/services/payment_follow_ups.py) -----------------

    async def queue_settlement(self, connection: Transaction, call: Record) -> None:
        """At settlement: capture what each authorisation paid for (in order) and release the
        rest. A call that owes nothing (waived, never connected) has everything given back."""
        await payment_follow_ups.queue_settlement(connection, call, clock=self._clock)

    async def give_back(self, connection: Transaction, call: Record) -> int:
        """Leave the account as if the call's charges had never been made (a waiver, or a call
        that never connected): `payment_follow_ups.give_back`. Idempotent; called again whenever
        one of the call's card payments completes later. Returns how many ledger charges were
        reversed now."""
        return await payment_follow_ups.give_back(connection, call, clock=self._clock)


def _completed_at_gateway(found: GatewayResult | None, kind: str) -> TypeGuard[GatewayResult]:
    """The gateway holds the payment done: its hold placed (an authorisation) or paid."""
    wanted = "requires_capture" if kind == PaymentKind.AUTHORIZE else "succeeded"
    return found is not None and found.status in (wanted, "succeeded")


def _not_completed(found: GatewayResult | None) -> str:
    """Why a payment the gateway did not complete is failed."""
    return f"not completed at the gateway ({found.status if found else 'never received'})"


async def post_incident(
    connection: Transaction,
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


async def _lock_operation(connection: Transaction, key: str) -> tuple[Record, Record | None]:
    """A payment operation and its call, locked in the one order: the call's row, then the
    account's row (funding.py)."""
    operation = await payments_store.get_operation(connection, key)
    call = (
        None
        if operation.call_sid is None
        else await calls_store.get_call(connection, operation.call_sid, for_update=True)
    )
    await lock_account(connection, operation.account_id)
    return operation, call
