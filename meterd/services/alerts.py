"""Alerts to the desk (docs/alerts.md): a JSON event POSTed to `alerts_url`, signed, when an
account's banked minutes or deposit cross below its threshold, when a call runs out of funds,
when a card is charged or declined, and when a call is waived.

- **Once.** Each alert has a unique event id and is recorded once, in the transaction that made
  it happen (a card payment, a waiver, exhaustion) or, for a balance, by the one transaction
  that moves the account's recorded state below its threshold (`alerts_store.moved`): told
  once per crossing, and again only after the balance has come back up. A balance is looked at
  by a job every few seconds (`watch_balances`); the first look records where it stands
  without an alert.
- **Delivered after.** A job sends what is due (`deliver`); a failed attempt is retried with
  backoff (`RETRY_SECONDS`), then given up after `ATTEMPTS_MAX` and logged. An alert delivered
  is never sent again; a crash between sending and recording the delivery sends it once more
  (the event id lets the receiver drop the repeat).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from meterd.clock import Clock
from meterd.logs import get_logger
from meterd.store import alerts_store
from meterd.store.database import Database
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.alerts")

RETRY_SECONDS = (5, 30, 120, 600, 1800)  # after the 1st, 2nd, ... failed attempt; then the last
ATTEMPTS_MAX = 10
DELIVER_BATCH_MAX = 100
CARD_OPERATIONS_TOLD = frozenset({"charge", "authorize", "incident"})  # payments_store.PaymentKind


class AlertKind(StrEnum):
    BANK_LOW = "balance.bank_low"
    DEPOSIT_LOW = "balance.deposit_low"
    FUNDS_EXHAUSTED = "call.funds_exhausted"
    CARD_CHARGED = "card.charged"
    CARD_DECLINED = "card.declined"
    CALL_WAIVED = "call.waived"
    CALL_MISSING_IN_METERD = "call.missing_in_meterd"  # Twilio has it; meterd never recorded it


@dataclass(frozen=True)
class _Change:
    account_id: str
    balance: str  # "bank" or "deposit"
    kind: AlertKind
    below: bool
    first_look: bool  # never looked at: recorded where it stands, no alert
    data: dict[str, Any]


class Sender(Protocol):
    async def send(self, event_id: str, body: bytes) -> None: ...


class AlertService:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        sender: Sender | None,
        *,
        bank_minutes_below: int,
        deposit_minor_below: int,
    ) -> None:
        self._database = database
        self._clock = clock
        self._sender = sender
        self._bank_minutes_below = bank_minutes_below
        self._deposit_minor_below = deposit_minor_below

    @property
    def enabled(self) -> bool:
        return self._sender is not None

    async def record(
        self,
        connection: Transaction,
        kind: AlertKind,
        account_id: str,
        cause: str,
        data: dict[str, Any],
        now: dt.datetime,
    ) -> None:
        """Record an alert in the caller's transaction, once per `cause` (what made it happen,
        e.g. a payment's key); nothing when alerts are off."""
        if not self.enabled:
            return
        event_id = f"{kind.value}:{cause}"
        body = {
            "id": event_id,
            "type": kind.value,
            "account_id": account_id,
            "occurred_at": now.isoformat(),
            "data": data,
        }
        await alerts_store.record(
            connection,
            event_id=event_id,
            account_id=account_id,
            kind=kind.value,
            body_json=json.dumps(body, sort_keys=True, separators=(",", ":")),
            now=now,
        )

    async def card(
        self, connection: Transaction, operation: Record, error: str | None, now: dt.datetime
    ) -> None:
        """A card charged (`error` None) or declined, in the payment's transaction. A capture,
        a release or a refund is not news: the charge or authorisation it follows was."""
        if operation.kind not in CARD_OPERATIONS_TOLD:
            return
        data: dict[str, Any] = {
            "operation_key": operation.operation_key,
            "operation": operation.kind,
            "call_sid": operation.call_sid,
            "amount_minor": operation.amount_minor,
            "currency": operation.currency,
        }
        kind = AlertKind.CARD_CHARGED if error is None else AlertKind.CARD_DECLINED
        if error is not None:
            data["error"] = error[:200]
        await self.record(
            connection, kind, operation.account_id, operation.operation_key, data, now
        )

    async def watch_balances(self) -> int:
        """Look at every account's banked minutes and deposit against its thresholds; record
        an alert for each that crossed below since the last look. Returns how many. Read
        first: a write transaction is opened only when a balance moved across its threshold."""
        if not self.enabled:
            return 0
        now = self._clock()
        async with self._database.read() as connection:
            rows = await alerts_store.balances_and_thresholds(connection)
        changes = [change for row in rows for change in self._changes(row)]
        if not changes:
            return 0
        told = 0
        async with self._database.write() as connection:
            for change in changes:
                if change.first_look:
                    await alerts_store.first_seen(
                        connection, change.account_id, change.balance, change.below, now
                    )
                    continue
                crossed = await alerts_store.moved(
                    connection, change.account_id, change.balance, change.below, now
                )  # False: another meterd saw it first
                if crossed and change.below:
                    cause = f"{change.account_id}:{now.isoformat()}"
                    await self.record(
                        connection, change.kind, change.account_id, cause, change.data, now
                    )
                    told += 1
        return told

    def _changes(self, row: Any) -> list[_Change]:
        """Where an account's balances stand now, where that differs from what was recorded."""
        looks = (
            ("bank", AlertKind.BANK_LOW, row.bank, row.alert_bank_minutes_below,
             self._bank_minutes_below, row.bank_below),
            ("deposit", AlertKind.DEPOSIT_LOW, row.deposit, row.alert_deposit_minor_below,
             self._deposit_minor_below, row.deposit_below),
        )  # fmt: skip
        changes = []
        for balance, kind, held, own, default, was_below in looks:
            threshold = default if own is None else own
            below = threshold > 0 and (held or 0) < threshold
            if was_below is not None and bool(was_below) == below:
                continue
            data: dict[str, Any] = {"balance": held or 0, "threshold": threshold}
            if balance == "deposit":
                data["currency"] = row.currency
            changes.append(_Change(row.account_id, balance, kind, below, was_below is None, data))
        return changes

    async def deliver(self) -> int:
        """Send the alerts that are due; returns how many were delivered."""
        if self._sender is None:
            return 0
        now = self._clock()
        async with self._database.read() as connection:
            pending = await alerts_store.due(connection, now, DELIVER_BATCH_MAX)
        delivered = 0
        for alert in pending:
            wait = RETRY_SECONDS[min(alert.attempts, len(RETRY_SECONDS) - 1)]
            async with self._database.write() as connection:
                claimed = await alerts_store.claim(
                    connection, alert.alert_id, alert.attempts, now + dt.timedelta(seconds=wait)
                )
            if not claimed:
                continue  # another meterd has it
            try:
                await self._sender.send(alert.event_id, alert.body_json.encode())
            except Exception as error:  # the sender says why; retried later
                given_up = alert.attempts + 1 >= ATTEMPTS_MAX
                (log.error if given_up else log.warning)(
                    "alert not delivered" + ("; given up" if given_up else "; will retry"),
                    event_id=alert.event_id,
                    attempts=alert.attempts + 1,
                    error=str(error)[:300],
                )
                async with self._database.write() as connection:
                    await alerts_store.mark_not_delivered(
                        connection,
                        alert.alert_id,
                        str(error)[:1000],
                        given_up_at=self._clock() if given_up else None,
                    )
                continue
            async with self._database.write() as connection:
                await alerts_store.mark_delivered(connection, alert.alert_id, self._clock())
            delivered += 1
            log.info("alert delivered", event_id=alert.event_id, kind=alert.kind)
        return delivered
