"""Callbacks: the desk calls a customer back, and the call is metered like an incoming one.

`POST /agents/callbacks` (agents token) names the account (or a caller number on exactly one
account), the agent, the number to ring and the client's reference. meterd checks funding
through the funding authority as the connect gate does for a per-minute caller (a banked
minute, a minute in the deposit, or a card on file; an outbound leg has no `<Pay>`), refuses
with 409 `no_funds` saying why, and otherwise asks Twilio (the REST adapter) to ring the number
from `callback_from_number`. When the customer answers, Twilio fetches `/twilio/callback`,
which runs the connect gate again (funds may have gone meanwhile; the card on file is charged
then, if the account has no funds) and puts the customer into a conference named after the
call's sid, labelled `customer`, with the same conference and call-status callbacks as an
incoming call. The agent's tool joins that conference as `agent:<agent_id>` (the callback's
view names it), as it does for incoming calls. From there it is a call like any other, whose
`direction` is `outbound`.

Decisions where the issue is silent:
- the client reference names one callback: the same reference with the same request gives the
  callback back (200), with a different one 409; a refusal (no funds, an unknown account) does
  not use the reference up, so the desk may try again with it once the account is funded;
- meterd asks Twilio once (its Calls create has no idempotency key: a retry after a timeout
  could ring the customer twice); a failure is `not_placed` with Twilio's reason (502). If a
  timed-out request did reach Twilio, the answer webhook links the call anyway;
- busy, no answer, failed, canceled, or hung up before being connected: the call ends without
  having connected, nothing is charged, and the callback's `outcome` says which.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from meterd.adapters.twilio_rest import TwilioRestError
from meterd.clock import Clock
from meterd.core.plans import Plan
from meterd.logs import get_logger
from meterd.services import validation as v
from meterd.services.answering import Action, Answer, AnsweringService, call_sid_of
from meterd.services.errors import (
    Conflict,
    InvalidRequest,
    InvariantBroken,
    NotFound,
    ServiceError,
)
from meterd.services.funding import FundingAuthority
from meterd.services.research import AGENT_ID
from meterd.store import accounts_store, callbacks_store, calls_store
from meterd.store.calls_store import CallStatus, EventRecord
from meterd.store.database import Database
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.callbacks")

CALLBACK_ID = re.compile(r"\Acb_[0-9a-f]{24}\Z")
PHONE_NUMBER = re.compile(r"\+[1-9][0-9]{6,14}")  # E.164
# How a callback that rang ended, from the call's end reason (`calls.end_reason`).
_OUTCOME_OF_END = {
    "call-busy": "busy",
    "call-no-answer": "no-answer",
    "call-failed": "failed",
    "call-canceled": "canceled",
    "call-completed": "hung_up_before_connecting",
    "no_funds": "no_funds",
    "no_payment": "no_funds",
}


class CallbackStatus(StrEnum):
    PLACING = "placing"  # the reference is claimed; meterd is asking Twilio to ring
    PLACED = "placed"  # Twilio gave the call its sid: the call says what happened next
    NOT_PLACED = "not_placed"  # Twilio refused, or did not answer in time (`reason`)


class CallbacksOff(ServiceError):
    """No Twilio account or no `callback_from_number`: meterd cannot place calls (503)."""

    code = "callbacks_off"


class NoFunds(Conflict):
    code = "no_funds"


class NotPlaced(ServiceError):
    """Twilio did not place the call (502); `view` is the callback as stored."""

    code = "twilio_failed"

    def __init__(self, detail: str, view: dict[str, Any]) -> None:
        super().__init__(detail)
        self.view = view


@runtime_checkable
class CallPlacer(Protocol):
    """What callbacks need of Twilio's REST API: `meterd.adapters.twilio_rest.TwilioRest`."""

    async def place_call(self, *, to: str, from_: str, url: str, status_callback: str) -> str: ...


@dataclass(frozen=True)
class CallbackRequest:
    client_reference: str
    agent_id: str
    to_number: str
    account_id: str | None  # one of these two names the account
    caller_number: str | None

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def parse_request(body: Any) -> CallbackRequest:
    """The request's fields, each checked (InvalidRequest names the first one wrong)."""
    body = v.require_object(body)
    # required: text() raises rather than give None
    reference = v.text(body, "client_reference", pattern=v.REFERENCE, max_chars=128) or ""
    agent_id = v.text(body, "agent_id", pattern=AGENT_ID, max_chars=64) or ""
    account_id = v.text(body, "account_id", required=False, max_chars=64)
    caller_number = v.text(body, "caller_number", required=False, pattern=PHONE_NUMBER)
    to_number = v.text(body, "to", required=False, pattern=PHONE_NUMBER) or caller_number
    if (account_id is None) == (caller_number is None):
        raise InvalidRequest("give account_id or caller_number (one of them)")
    if to_number is None:
        raise InvalidRequest("to is required (an E.164 number) unless caller_number is given")
    return CallbackRequest(reference, agent_id, to_number, account_id, caller_number)


@dataclass(frozen=True)
class CallbackSettings:
    public_base_url: str
    from_number: str  # empty: callbacks are off


class CallbackService:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        funding: FundingAuthority,
        answering: AnsweringService,
        placer: CallPlacer | None,
        settings: CallbackSettings,
    ) -> None:
        self._database = database
        self._clock = clock
        self._funding = funding
        self._answering = answering
        self._placer = placer
        self._settings = settings

    async def request(self, body: Any) -> tuple[dict[str, Any], bool]:
        """Place the callback `body` asks for (or give back the one its reference names): its
        view, and whether this request placed it. Raises InvalidRequest, NotFound, NoFunds,
        Conflict (a reference reused for another request), CallbacksOff, NotPlaced."""
        asked = parse_request(body)
        placer = self._placer
        if placer is None or not self._settings.from_number:
            raise CallbacksOff(
                "callbacks are off: meterd needs twilio_account_sid and callback_from_number"
            )
        now = self._clock()
        async with self._database.write() as connection:
            existing = await callbacks_store.by_reference(connection, asked.client_reference)
            if existing is None:
                account_id = await self._account_of(connection, asked)
                new = callbacks_store.NewCallback(
                    callback_id="cb_" + secrets.token_hex(12),
                    client_reference=asked.client_reference,
                    request_sha256=asked.sha256(),
                    account_id=account_id,
                    agent_id=asked.agent_id,
                    to_number=asked.to_number,
                    status=CallbackStatus.PLACING,
                )
                # the reference first, then the account's lock (the order `_link` takes them
                # in: two requests never wait on each other in a circle); a refusal below rolls
                # the claim back, so it does not use the reference up
                if await callbacks_store.claim(connection, new, now):
                    await self._check_funding(connection, account_id, now)
                else:
                    existing = await callbacks_store.by_reference(connection, new.client_reference)
            if existing is not None:
                if existing.request_sha256 != asked.sha256():
                    raise Conflict(
                        f"client_reference {asked.client_reference} names another callback"
                    )
                return await self._view(connection, existing), False
        return await self._place(placer, new), True

    async def view(self, callback_id: str) -> dict[str, Any]:
        if not CALLBACK_ID.match(callback_id):
            raise NotFound(f"no callback {callback_id[:40]}")
        async with self._database.read() as connection:
            callback = await callbacks_store.get_callback(connection, callback_id)
            if callback is None:
                raise NotFound(f"no callback {callback_id}")
            return await self._view(connection, callback)

    async def answered(self, form: Mapping[str, str], callback_id: str) -> Answer:
        """Twilio's voice webhook for a callback the customer answered: connect them (after the
        connect gate), or say why not. A repeated delivery gets the answer the call's state
        gives."""
        call_sid = call_sid_of(form)
        if not CALLBACK_ID.match(callback_id):
            raise InvalidRequest("callback must name a callback (cb_ and 24 hex digits)")
        now = self._clock()
        async with self._database.write() as connection:
            callback = await callbacks_store.get_callback(connection, callback_id, for_update=True)
            if callback is None:
                raise NotFound(f"no callback {callback_id}")
            if callback.call_sid not in (None, call_sid):
                raise InvalidRequest(f"callback {callback_id} placed another call")
            new = await calls_store.record_event(
                connection,
                EventRecord(
                    dedup_key=f"callback:{call_sid}",
                    route="callback",
                    call_sid=call_sid,
                    kind="answered",
                    params=list(form.items()),
                    received_at=now,
                ),
            )
            await _link(connection, callback, call_sid, now)
            call = await calls_store.get_call(connection, call_sid)
            if new and call is not None and call.status == CallStatus.MENU:
                # a callback's call begins when the customer answers, as an incoming call's
                # does (its ringing is not the call's length: Twilio's `duration` neither)
                await calls_store.update_call(
                    connection, call_sid, started_at=now, last_event_at=now
                )
            if not new or call is None or call.status != CallStatus.MENU:
                return _answer_from_state(call_sid, call)
        log.info("callback answered", call_sid=call_sid, callback_id=callback_id)
        return await self._answering.callback_answered(call_sid, callback.account_id)

    async def _account_of(self, connection: Transaction, asked: CallbackRequest) -> str:
        if asked.account_id is not None:
            if await accounts_store.get_account(connection, asked.account_id) is None:
                raise NotFound(f"no account {asked.account_id}")
            return asked.account_id
        accounts = await accounts_store.accounts_of_number(connection, asked.caller_number or "")
        if not accounts:
            raise NotFound(f"no account has caller number {asked.caller_number}")
        if len(accounts) > 1:
            raise Conflict(f"{asked.caller_number} is on several accounts: give account_id")
        return str(accounts[0])

    async def _check_funding(
        self, connection: Transaction, account_id: str, now: dt.datetime
    ) -> None:
        """A per-minute account must be able to pay a minute, as at the connect gate."""
        account = await accounts_store.get_account(connection, account_id)
        if account is None:
            raise NotFound(f"no account {account_id}")
        if self._answering.plan_in_force(account, now) is Plan.PER_MINUTE:
            why = await self._funding.why_no_callback(connection, account_id, now)
            if why is not None:
                log.info("callback refused: no funds", account_id=account_id, detail=why)
                raise NoFunds(why)

    async def _place(self, placer: CallPlacer, new: callbacks_store.NewCallback) -> dict[str, Any]:
        """Ask Twilio to ring the customer (outside any transaction), then record the call."""
        base = self._settings.public_base_url
        try:
            call_sid = await placer.place_call(
                to=new.to_number,
                from_=self._settings.from_number,
                url=f"{base}/twilio/callback?callback={new.callback_id}",
                status_callback=f"{base}/twilio/call-status",
            )
        except TwilioRestError as error:
            async with self._database.write() as connection:
                await callbacks_store.update_callback(
                    connection,
                    new.callback_id,
                    self._clock(),
                    status=CallbackStatus.NOT_PLACED,
                    reason=str(error)[:500],
                )
                view = await self._view(connection, await _stored(connection, new.callback_id))
            log.warning("callback not placed", callback_id=new.callback_id, error=str(error))
            raise NotPlaced(f"Twilio did not place the call: {error}", view) from error
        async with self._database.write() as connection:
            callback = await _stored(connection, new.callback_id, for_update=True)
            await _link(connection, callback, call_sid, self._clock())
            callback = await _stored(connection, new.callback_id)
            log.info("callback placed", callback_id=new.callback_id, call_sid=call_sid)
            return await self._view(connection, callback)

    async def _view(self, connection: Transaction, callback: Record) -> dict[str, Any]:
        call = None
        if callback.call_sid is not None:
            call = await calls_store.get_call(connection, callback.call_sid)
        return {
            "callback_id": callback.callback_id,
            "client_reference": callback.client_reference,
            "account_id": callback.account_id,
            "agent_id": callback.agent_id,
            "to": callback.to_number,
            "status": callback.status,
            "reason": callback.reason,
            "call_sid": callback.call_sid,
            # the agent's tool joins this conference with this label
            "conference": callback.call_sid,
            "participant_label": f"agent:{callback.agent_id}",
            "outcome": outcome(callback, call),
            "requested_at": callback.requested_at.isoformat(),
        }


def _answer_from_state(call_sid: str, call: Record | None) -> Answer:
    """What a repeated answer webhook hears: what the first one did, as far as the call's state
    tells (a call still being paid for hears a hang-up: Twilio retries only a lost answer)."""
    if call is not None and call.status == CallStatus.CONNECTED:
        return Answer(Action.CONNECT, call_sid)
    if call is not None and _OUTCOME_OF_END.get(call.end_reason or "") == "no_funds":
        return Answer(Action.NO_FUNDS, call_sid)
    return Answer(Action.HANG_UP, call_sid)


def outcome(callback: Record, call: Record | None) -> str:
    """Where the callback is, in a word: placing, not_placed, ringing, connected, completed,
    busy, no-answer, failed, canceled, hung_up_before_connecting, no_funds, or unknown (closed
    with no word from Twilio)."""
    if call is None:
        return str(callback.status)
    if call.status == CallStatus.MENU:
        return "ringing"
    if call.status == CallStatus.CONNECTED:
        return "connected"
    if call.status == CallStatus.ENDED:
        return "completed"
    return _OUTCOME_OF_END.get(call.end_reason or "", "unknown")


async def _stored(connection: Transaction, callback_id: str, *, for_update: bool = False) -> Record:
    """A callback this request stored (it must be there)."""
    callback = await callbacks_store.get_callback(connection, callback_id, for_update=for_update)
    if callback is None:
        raise InvariantBroken(f"callback {callback_id} was stored and then was not")
    return callback


async def _link(connection: Transaction, callback: Record, call_sid: str, now: dt.datetime) -> None:
    """The callback's call, from Twilio's sid: the callback placed, and the call recorded as an
    outbound call of the account, not yet connected (status `menu`: answered or ringing)."""
    if callback.call_sid is None or callback.status != CallbackStatus.PLACED:
        await callbacks_store.update_callback(
            connection, callback.callback_id, now, call_sid=call_sid, status=CallbackStatus.PLACED
        )
    if await calls_store.get_call(connection, call_sid) is None:
        await calls_store.insert_call(
            connection, call_sid=call_sid, from_number=callback.to_number, now=now
        )
        await calls_store.update_call(
            connection, call_sid, account_id=callback.account_id, direction="outbound"
        )
