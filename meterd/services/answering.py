"""Answering an incoming call: who is calling, and may they be connected?

The caller is identified by `From` against the accounts' caller IDs; a withheld number, a number
on no account or on several accounts leads to the PIN prompt (3 tries). A caller whose plan needs
no payment step is connected to the conference named after their CallSid; a per_minute caller
with no banked minute and less than one agent-minute in the deposit is told how to buy minutes
and is not connected (the card step is the payment gate's, a later piece).

A repeated delivery of the same webhook (Twilio retries) gets the answer the call's stored state
gives, and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from zoneinfo import ZoneInfo

from meterd.clock import Clock
from meterd.core.plans import Plan, effective_plan
from meterd.logs import get_logger
from meterd.services.accounts import pin_hash
from meterd.services.errors import InvalidRequest, InvariantBroken, NotFound
from meterd.services.funding import FundingAuthority, lock_account
from meterd.services.payments import PaymentService
from meterd.store import accounts_store, calls_store
from meterd.store.calls_store import CallStatus, EventRecord
from meterd.store.database import Database
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.answering")

CALL_SID = re.compile(r"\ACA[0-9a-fA-F]{32}\Z")  # \Z: "$" would let a trailing newline in
PIN_ATTEMPTS_MAX = 3

# <Pay>'s Result values (docs/twilio-setup.md) and what the caller is told about each.
PAY_RESULT_REASONS = {
    "success": "declined",  # tokenised, but the gateway then said no
    "too-many-failed-attempts": "invalid_card",
    "payment-connector-error": "unavailable",
    "caller-interrupted-with-star": "star",
    "validation-error": "invalid_card",
    "internal-error": "unavailable",
}
# Fields of <Pay>'s callbacks that are card data; they are never stored or logged.
CARD_FIELDS = frozenset(
    {
        "PaymentToken",
        "ExpirationDate",
        "SecurityCode",
        "PaymentCardPostalCode",
        "BankAccountNumber",
        "BankRoutingNumber",
        "ProfileId",
        "PaymentConfirmationCode",
    }
)


def redact_payment_fields(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What may be kept of a <Pay> callback: card data removed, the card number cut to its
    last four."""
    kept = []
    for name, value in params:
        if name in CARD_FIELDS:
            kept.append((name, "[redacted]"))
        elif name == "PaymentCardNumber":
            kept.append((name, value[-4:]))
        else:
            kept.append((name, value))
    return kept


# A number whose callers failed the PIN this many times within the hour is not asked again, so
# PINs cannot be guessed by calling over and over (withheld numbers share one count).
PIN_LOCKOUT_CALLS = 5
PIN_LOCKOUT_WINDOW = dt.timedelta(hours=1)


class Action(StrEnum):
    CONNECT = "connect"  # <Dial><Conference> named after the CallSid
    ASK_PIN = "ask_pin"  # <Gather> the PIN (attempt n; `retry` after a wrong one)
    UNKNOWN_CALLER = "unknown_caller"  # polite goodbye, not connected
    NO_FUNDS = "no_funds"  # how to buy minutes, not connected (no card payments configured)
    COLLECT_CARD = "collect_card"  # <Pay> to tokenise a card (attempt n; `reason` on a retry)
    PAY_GOODBYE = "pay_goodbye"  # no payment after the last attempt: polite goodbye
    HANG_UP = "hang_up"  # the call is already over
    NEEDS_PAYMENT = "needs_payment"  # internal: decided in the transaction, paid after it


@dataclass(frozen=True)
class Answer:
    action: Action
    call_sid: str
    attempt: int = 1
    retry: bool = False
    reason: str = ""  # why a card attempt failed: declined, unavailable, star, ...


@dataclass(frozen=True)
class AnsweringSettings:
    pin_secret: str
    pay_attempts: int = 3
    business_timezone: str = "UTC"  # whose calendar day `valid_until` ends on


def call_sid_of(form: Mapping[str, str]) -> str:
    call_sid = form.get("CallSid", "")
    if not CALL_SID.match(call_sid):
        raise InvalidRequest("CallSid is missing or is not a Twilio call sid (CA + 32 hex)")
    return call_sid


class AnsweringService:
    def __init__(
        self,
        database: Database,
        settings: AnsweringSettings,
        clock: Clock,
        payments: PaymentService,
        funding: FundingAuthority,
    ) -> None:
        self._database = database
        self._settings = settings
        self._clock = clock
        self._payments = payments
        self._funding = funding

    async def incoming(self, form: Mapping[str, str], params: list[tuple[str, str]]) -> Answer:
        return await self._pay_if_needed(await self._incoming(form, params))

    async def pin_entered(
        self, form: Mapping[str, str], params: list[tuple[str, str]], attempt: int
    ) -> Answer:
        return await self._pay_if_needed(await self._pin_entered(form, params, attempt))

    async def card_entered(
        self, form: Mapping[str, str], params: list[tuple[str, str]], attempt: int
    ) -> Answer:
        """The `<Pay>` action: a tokenised card (or why there is none). The caller is connected
        only if the card was saved and the gateway charged or authorised it."""
        call_sid = call_sid_of(form)
        if not 1 <= attempt <= self._settings.pay_attempts:
            raise InvalidRequest(f"attempt must be 1 to {self._settings.pay_attempts}")
        result = form.get("Result", "")
        now = self._clock()
        async with self._database.write() as connection:
            call = await calls_store.get_call(connection, call_sid, for_update=True)
            if call is None:
                raise NotFound(f"unknown call {call_sid}")
            new = await calls_store.record_event(
                connection,
                EventRecord(
                    dedup_key=f"pay:{call_sid}:{attempt}",
                    route="pay",
                    call_sid=call_sid,
                    kind=result[:64] or "pay",
                    params=redact_payment_fields(params),
                    received_at=now,
                ),
            )
            if not new or call.status != CallStatus.MENU or call.account_id is None:
                return await self._answer_from_state(connection, call_sid)
            await calls_store.update_call(
                connection, call_sid, pay_attempts=attempt, last_event_at=now
            )
            if result == "caller-hung-up":
                await calls_store.update_call(
                    connection,
                    call_sid,
                    status=CallStatus.REJECTED,
                    ended_at=now,
                    end_reason="hung_up_in_payment",
                )
                return Answer(Action.HANG_UP, call_sid)
            account_id = call.account_id
        reason = PAY_RESULT_REASONS.get(result, "error")
        token = form.get("PaymentToken", "")
        if result == "success" and token and self._payments is not None:
            outcome = await self._payments.save_card(account_id, token)
            if outcome.ok:
                outcome = await self._payments.pay_for_call(call_sid, account_id)
            if outcome.ok:
                return await self._connect(call_sid, account_id)
            reason = outcome.reason
        log.info("card attempt failed", call_sid=call_sid, attempt=attempt, reason=reason)
        if attempt >= self._settings.pay_attempts:
            async with self._database.write() as connection:
                await calls_store.update_call(
                    connection,
                    call_sid,
                    status=CallStatus.REJECTED,
                    ended_at=self._clock(),
                    end_reason="no_payment",
                )
            return Answer(Action.PAY_GOODBYE, call_sid, reason=reason)
        return Answer(Action.COLLECT_CARD, call_sid, attempt=attempt + 1, retry=True, reason=reason)

    async def callback_answered(self, call_sid: str, account_id: str) -> Answer:
        """A callback's customer picked up (`meterd/services/callbacks.py`): the connect gate
        as for an incoming call, the card on file charged if the account has no funds, but no
        `<Pay>`, since an outbound leg is never asked for a card: without funds, NO_FUNDS and
        the call is not connected."""
        async with self._database.write() as connection:
            answer = await self._gate(connection, call_sid, account_id, self._clock())
        answer = await self._pay_if_needed(answer)
        if answer.action is not Action.COLLECT_CARD:
            return answer
        async with self._database.write() as connection:
            call = await calls_store.get_call(connection, call_sid, for_update=True)
            if call is not None and call.status == CallStatus.MENU:
                await calls_store.update_call(
                    connection,
                    call_sid,
                    status=CallStatus.REJECTED,
                    ended_at=self._clock(),
                    end_reason="no_payment",
                )
        log.info("callback answered but the card on file did not pay", call_sid=call_sid)
        return Answer(Action.NO_FUNDS, call_sid)

    async def _pay_if_needed(self, answer: Answer) -> Answer:
        """A per-minute caller with no funds: charge the card on file if there is one, else
        ask for a card with <Pay>. Never connected unless the gateway said yes."""
        if answer.action is not Action.NEEDS_PAYMENT or self._payments is None:
            return answer
        async with self._database.read() as connection:
            call = await calls_store.get_call(connection, answer.call_sid)
        if call is None or call.account_id is None:
            raise InvariantBroken(f"call {answer.call_sid} went away while it was paying")
        outcome = await self._payments.pay_for_call(answer.call_sid, call.account_id)
        if outcome.ok:
            return await self._connect(answer.call_sid, call.account_id)
        if outcome.reason != "no_card":
            log.info(
                "card on file not accepted; asking for a card",
                call_sid=answer.call_sid,
                reason=outcome.reason,
            )
        return Answer(
            Action.COLLECT_CARD,
            answer.call_sid,
            attempt=1,
            retry=outcome.reason != "no_card",
            reason=outcome.reason,
        )

    async def _connect(self, call_sid: str, account_id: str) -> Answer:
        """Connect a caller who has just paid, unless they hung up while the payment was on its
        way: then the call stays ended and the payment is given back."""
        async with self._database.write() as connection:
            if not await calls_store.connect_from_menu(connection, call_sid, self._clock()):
                call = await calls_store.get_call(connection, call_sid, for_update=True)
                if call is None:
                    raise InvariantBroken(f"call {call_sid} went away while connecting")
                if call.status != CallStatus.CONNECTED:
                    await lock_account(connection, account_id)
                    await self._payments.give_back(connection, call)
                    log.info(
                        "caller hung up while paying; the payment is given back",
                        call_sid=call_sid,
                    )
                    return Answer(Action.HANG_UP, call_sid)
        log.info("connecting caller after payment", call_sid=call_sid, account_id=account_id)
        return Answer(Action.CONNECT, call_sid)

    async def _incoming(self, form: Mapping[str, str], params: list[tuple[str, str]]) -> Answer:
        call_sid = call_sid_of(form)
        now = self._clock()
        async with self._database.write() as connection:
            new = await calls_store.record_event(
                connection,
                EventRecord(
                    dedup_key=f"voice:{call_sid}",
                    route="voice",
                    call_sid=call_sid,
                    kind="incoming",
                    params=params,
                    received_at=now,
                ),
            )
            if not new:
                return await self._answer_from_state(connection, call_sid)
            await calls_store.insert_call(
                connection, call_sid=call_sid, from_number=form.get("From", "")[:64], now=now
            )
            account_ids = await accounts_store.accounts_of_number(connection, form.get("From", ""))
            if len(account_ids) == 1:
                return await self._gate(connection, call_sid, account_ids[0], now)
            if await self._locked_out(connection, form.get("From", "")[:64], now):
                await calls_store.update_call(
                    connection,
                    call_sid,
                    status=CallStatus.REJECTED,
                    ended_at=now,
                    end_reason="pin_locked_out",
                )
                log.warning(
                    "PIN prompt refused: too many failed PINs from this number", call_sid=call_sid
                )
                return Answer(Action.UNKNOWN_CALLER, call_sid)
            log.info(
                "caller not identified by number; asking for the PIN",
                call_sid=call_sid,
                matches=len(account_ids),
            )
            return Answer(Action.ASK_PIN, call_sid, attempt=1)

    async def _pin_entered(
        self, form: Mapping[str, str], params: list[tuple[str, str]], attempt: int
    ) -> Answer:
        call_sid = call_sid_of(form)
        if not 1 <= attempt <= PIN_ATTEMPTS_MAX:
            raise InvalidRequest(f"attempt must be 1 to {PIN_ATTEMPTS_MAX}")
        digits = form.get("Digits", "")
        now = self._clock()
        async with self._database.write() as connection:
            call = await calls_store.get_call(connection, call_sid, for_update=True)
            if call is None:
                raise NotFound(f"unknown call {call_sid}")
            new = await calls_store.record_event(
                connection,
                EventRecord(
                    dedup_key=f"pin:{call_sid}:{attempt}",
                    route="pin",
                    call_sid=call_sid,
                    kind="pin",
                    params=[(k, "***" if k == "Digits" else v) for k, v in params],
                    received_at=now,
                ),
            )
            if not new or call.status != CallStatus.MENU:
                return await self._answer_from_state(connection, call_sid)
            account_id = None
            if digits.isdigit() and 4 <= len(digits) <= 8:
                account_id = await accounts_store.account_with_pin(
                    connection, pin_hash(self._settings.pin_secret, digits)
                )
            if account_id is not None:
                return await self._gate(connection, call_sid, account_id, now)
            await calls_store.update_call(
                connection, call_sid, pin_attempts=attempt, last_event_at=now
            )
            if attempt >= PIN_ATTEMPTS_MAX:
                await calls_store.update_call(
                    connection,
                    call_sid,
                    status=CallStatus.REJECTED,
                    ended_at=now,
                    end_reason="pin_not_recognised",
                )
                log.info("PIN not recognised; caller not connected", call_sid=call_sid)
                return Answer(Action.UNKNOWN_CALLER, call_sid)
            return Answer(Action.ASK_PIN, call_sid, attempt=attempt + 1, retry=True)

    async def _locked_out(
        self, connection: Transaction, from_number: str, now: dt.datetime
    ) -> bool:
        failures = await calls_store.calls_refused_for_pin(
            connection, from_number, now - PIN_LOCKOUT_WINDOW
        )
        return failures >= PIN_LOCKOUT_CALLS

    def plan_in_force(self, account: Record, now: dt.datetime) -> Plan:
        """The plan that governs a call of `account` now, on the business day's calendar (a
        service agreement past its `valid_until` falls back)."""
        return effective_plan(
            Plan(account.plan),
            account.valid_until,
            Plan(account.fallback_plan),
            now.astimezone(ZoneInfo(self._settings.business_timezone)).date(),
        )

    async def _gate(
        self, connection: Transaction, call_sid: str, account_id: str, now: dt.datetime
    ) -> Answer:
        account = await accounts_store.get_account(connection, account_id)
        if account is None:
            raise InvariantBroken(f"account {account_id} was found and then was not")
        plan = self.plan_in_force(account, now)
        if plan is Plan.PER_MINUTE and not await self._funding.can_connect(
            connection, account_id, call_sid, now
        ):
            if self._payments is not None and self._payments.available:
                await calls_store.update_call(
                    connection, call_sid, account_id=account_id, plan=plan.value, last_event_at=now
                )
                return Answer(Action.NEEDS_PAYMENT, call_sid)
            await calls_store.update_call(
                connection,
                call_sid,
                account_id=account_id,
                plan=plan.value,
                status=CallStatus.REJECTED,
                ended_at=now,
                end_reason="no_funds",
            )
            log.info(
                "per-minute caller without funds; not connected",
                call_sid=call_sid,
                account_id=account_id,
            )
            return Answer(Action.NO_FUNDS, call_sid)
        await calls_store.update_call(
            connection,
            call_sid,
            account_id=account_id,
            plan=plan.value,
            status=CallStatus.CONNECTED,
            last_event_at=now,
        )
        log.info("connecting caller", call_sid=call_sid, account_id=account_id, plan=plan.value)
        return Answer(Action.CONNECT, call_sid)

    async def _answer_from_state(self, connection: Transaction, call_sid: str) -> Answer:
        call = await calls_store.get_call(connection, call_sid)
        if call is None:
            return Answer(Action.HANG_UP, call_sid)
        if call.status == CallStatus.CONNECTED:
            return Answer(Action.CONNECT, call_sid)
        if call.status == CallStatus.MENU and call.account_id is not None:
            return Answer(
                Action.COLLECT_CARD,
                call_sid,
                attempt=min(call.pay_attempts + 1, self._settings.pay_attempts),
                retry=call.pay_attempts > 0,
            )
        if call.status == CallStatus.MENU:
            return Answer(
                Action.ASK_PIN,
                call_sid,
                attempt=min(call.pin_attempts + 1, PIN_ATTEMPTS_MAX),
                retry=call.pin_attempts > 0,
            )
        if call.end_reason == "no_payment":
            return Answer(Action.PAY_GOODBYE, call_sid)
        if call.end_reason == "no_funds":
            return Answer(Action.NO_FUNDS, call_sid)
        if call.end_reason in ("pin_not_recognised", "pin_locked_out"):
            return Answer(Action.UNKNOWN_CALLER, call_sid)
        return Answer(Action.HANG_UP, call_sid)
