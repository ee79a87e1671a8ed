"""In-memory twins of meterd.store.repositories, for unit tests of the funding authority and
live metering that need no database.

`Store` holds everything (calls, accounts, books, transactions, card operations, outbox); a
`FakeDatabase` over it gives `write()` and `read()` like `meterd.store.database.Database`: the
block gets the store as its "connection", and a block that raises leaves the store as it was
(the unit of work rolls back unless it completes). `repositories(store)` is the factory the
services take. tests/unit/test_fake_repositories.py keeps these methods the same as the real
ones, name for name and parameter for parameter.

The ledger here keeps the rules the database enforces: one transaction per key (the same
content again is a replay, other content an `IdempotencyConflict`), customer books exist before
they are posted to and never go below zero unless allowed, system books open on first use.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from meterd.core import ledger
from meterd.core.timeline import ConferenceEvent, ResearchMark, Timeline
from meterd.store import ledger_store
from meterd.store.calls_store import CallStatus
from meterd.store.timeline_store import call_timeline

IN_FLIGHT = ("queued", "sent")

CALL_DEFAULTS: dict[str, Any] = {
    "status": CallStatus.CONNECTED,
    "plan": "per_minute",
    "account_id": "A1",
    "conference_sid": "CF" + "0" * 32,
    "started_at": None,
    "ended_at": None,
    "settled_at": None,
    "waived_at": None,
    "warned_at": None,
    "exhausted_at": None,
    "next_due_at": None,
    "closed_by_sweeper": False,
    "incident_group": None,
}


@dataclass
class Store:
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[ConferenceEvent]] = field(default_factory=dict)
    marks: dict[str, list[ResearchMark]] = field(default_factory=dict)
    leg_ends: dict[str, dt.datetime] = field(default_factory=dict)
    minutes_posted: dict[tuple[str, str], int] = field(default_factory=dict)
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    books: dict[str, dict[str, Any]] = field(default_factory=dict)
    transactions: dict[str, dict[str, Any]] = field(default_factory=dict)  # by key, in order
    card_operations: list[dict[str, Any]] = field(default_factory=list)
    outbox: dict[str, dict[str, Any]] = field(default_factory=dict)

    # --- setting a scene --------------------------------------------------------------------

    def add_account(
        self,
        account_id: str = "A1",
        *,
        bank_minutes: int = 0,
        deposit_minor: int = 0,
        currency: str = "USD",
        card: bool = False,
    ) -> None:
        self.accounts[account_id] = {
            "account_id": account_id,
            "currency": currency,
            "card_customer": "cus_1" if card else None,
            "card_on_file": "pm_1" if card else None,
            "debt_flagged": False,
        }
        self.books[ledger.bank_book(account_id)] = _book("minutes", False)
        self.books[ledger.deposit_book(account_id)] = _book(currency, False)
        self.books[ledger.bank_book(account_id)]["balance"] = bank_minutes
        self.books[ledger.deposit_book(account_id)]["balance"] = deposit_minor

    def add_call(self, call_sid: str, **values: Any) -> None:
        self.calls[call_sid] = {"call_sid": call_sid, **CALL_DEFAULTS, **values}
        self.events.setdefault(call_sid, [])
        self.marks.setdefault(call_sid, [])

    def add_event(self, call_sid: str, event: ConferenceEvent) -> None:
        self.events[call_sid].append(event)

    def add_card_operation(self, **values: Any) -> None:
        self.card_operations.append({"operation_id": len(self.card_operations) + 1, **values})

    def balance(self, book: str) -> int:
        return int(self.books.get(book, {"balance": 0})["balance"])


def _book(unit: str, allow_negative: bool) -> dict[str, Any]:
    return {"unit": unit, "allow_negative": allow_negative, "balance": 0}


class FakeDatabase:
    """`write()` and `read()` over a `Store`; a block that raises changes nothing."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dialect = "memory"

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Store]:
        before = copy.deepcopy(self.store.__dict__)
        try:
            yield self.store
        except BaseException:
            self.store.__dict__.update(before)
            raise

    read = write


class CallRepository:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def lock(self, call_sid: str) -> Any | None:
        row = self._store.calls.get(call_sid)
        return None if row is None else SimpleNamespace(**row)

    async def lock_many(self, call_sids: Sequence[str]) -> dict[str, Any]:
        return {
            sid: SimpleNamespace(**self._store.calls[sid])
            for sid in sorted(call_sids)
            if sid in self._store.calls
        }

    async def update(self, call_sid: str, **values: Any) -> None:
        self._store.calls[call_sid].update(values)

    async def timeline(self, call: Any, now: dt.datetime, research_max_seconds: int) -> Timeline:
        sid = call.call_sid
        return call_timeline(
            call,
            sorted(self._store.events[sid], key=lambda e: e.sequence_number),
            list(self._store.marks[sid]),
            self._store.leg_ends.get(sid),
            now,
            research_max_seconds,
        )

    async def timelines(
        self, batch: Sequence[Any], now: dt.datetime, research_max_seconds: int
    ) -> dict[str, Timeline]:
        return {c.call_sid: await self.timeline(c, now, research_max_seconds) for c in batch}

    async def minutes_posted(self, call_sid: str) -> dict[str, int]:
        return {a: n for (sid, a), n in self._store.minutes_posted.items() if sid == call_sid}

    async def minutes_posted_of(self, call_sids: Sequence[str]) -> dict[str, dict[str, int]]:
        return {sid: await self.minutes_posted(sid) for sid in call_sids}

    async def set_minutes_posted(self, call_sid: str, agent_id: str, minutes: int) -> None:
        self._store.minutes_posted[(call_sid, agent_id)] = minutes

    async def due(self, now: dt.datetime, limit: int) -> list[tuple[str, dt.datetime]]:
        due = [
            (c["call_sid"], c["next_due_at"])
            for c in self._store.calls.values()
            if c["next_due_at"] is not None and c["next_due_at"] <= now and not c["settled_at"]
        ]
        return sorted(due, key=lambda pair: pair[1])[:limit]

    async def grace_over(self, cutoff: dt.datetime, limit: int) -> list[str]:
        return [
            c["call_sid"]
            for c in self._store.calls.values()
            if c["exhausted_at"] is not None
            and c["exhausted_at"] <= cutoff
            and c["status"] == CallStatus.CONNECTED
            and c["waived_at"] is None
            and f"call:{c['call_sid']}:hang_up" not in self._store.outbox
        ][:limit]

    async def settleable(
        self, *, ended_by: dt.datetime, research_opened_after: dt.datetime, limit: int
    ) -> list[str]:
        def research_open(sid: str) -> bool:
            return any(
                m.end_seconds is None and m.start_seconds > research_opened_after.timestamp()
                for m in self._store.marks[sid]
            )

        ready = [
            c
            for c in self._store.calls.values()
            if c["settled_at"] is None
            and c["ended_at"] is not None
            and c["ended_at"] <= ended_by
            and c["status"] in (CallStatus.ENDED, CallStatus.REJECTED)
            and not research_open(c["call_sid"])
        ]
        return [c["call_sid"] for c in sorted(ready, key=lambda c: c["ended_at"])][:limit]

    async def settled_in_incident(self, group: str, *, other_than: str) -> list[Any]:
        return [
            SimpleNamespace(**c)
            for c in self._store.calls.values()
            if (c["incident_group"] == group or c["call_sid"] == group)
            and c["call_sid"] != other_than
            and c["settled_at"] is not None
            and c["waived_at"] is None
        ]


class AccountRepository:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def lock(self, account_id: str) -> Any | None:
        row = self._store.accounts.get(account_id)
        return None if row is None else SimpleNamespace(**row)

    async def lock_many(self, account_ids: Sequence[str]) -> dict[str, Any]:
        return {
            a: SimpleNamespace(**self._store.accounts[a])
            for a in sorted(account_ids)
            if a in self._store.accounts
        }


class LedgerRepository:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def balances(self, books: list[str]) -> dict[str, int]:
        return {book: self._store.balance(book) for book in books if book in self._store.books}

    async def post(
        self, transaction: ledger.Transaction, now: dt.datetime
    ) -> ledger_store.PostResult:
        earlier = self._store.transactions.get(transaction.key)
        if earlier is not None:
            if earlier["transaction"].fingerprint != transaction.fingerprint:
                raise ledger_store.IdempotencyConflict(
                    f"idempotency key {transaction.key!r} was already used for different content"
                )
            return ledger_store.PostResult(earlier["transaction_id"], replayed=True)
        books = self._store.books
        for posting in transaction.postings:
            if posting.book not in books:
                if not ledger_store.is_system_book(posting.book):
                    raise ledger_store.UnknownBook(f"{transaction.key}: no book {posting.book}")
                books[posting.book] = _book(posting.unit, True)
            books[posting.book]["balance"] += posting.amount
            book = books[posting.book]
            if book["balance"] < 0 and not book["allow_negative"]:
                raise ledger_store.InsufficientBalance(f"{transaction.key}: below zero")
        transaction_id = len(self._store.transactions) + 1
        self._store.transactions[transaction.key] = {
            "transaction_id": transaction_id,
            "transaction": transaction,
            "posted_at": now,
        }
        return ledger_store.PostResult(transaction_id, replayed=False)

    async def open_receivable(self, account_id: str, currency: str) -> None:
        self._store.books.setdefault(ledger.receivable_book(account_id), _book(currency, True))

    async def allow_debt(self, account_id: str) -> None:
        self._store.books[ledger.deposit_book(account_id)]["allow_negative"] = True
        self._store.accounts[account_id]["debt_flagged"] = True


class CardRepository:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def block_in_flight(self, account_id: str) -> bool:
        return any(
            op["status"] in IN_FLIGHT and op["account_id"] == account_id and op["kind"] == "charge"
            for op in self._store.card_operations
        )

    async def authorisation_in_flight(self, call_sid: str) -> bool:
        return any(
            op["status"] in IN_FLIGHT and op["call_sid"] == call_sid and op["kind"] == "authorize"
            for op in self._store.card_operations
        )

    async def decline_unresolved(self, call_sid: str, account_id: str) -> bool:
        purchases = [
            (i, op)
            for i, op in enumerate(self._store.card_operations)
            if op["kind"] in ("charge", "authorize")
        ]
        of_call = [(i, op) for i, op in purchases if op["call_sid"] == call_sid]
        if not of_call or of_call[-1][1]["status"] != "failed":
            return False
        failed_at = of_call[-1][0]
        return not any(
            i > failed_at and op["account_id"] == account_id and op["status"] == "succeeded"
            for i, op in purchases
        )

    async def operation_status(self, operation_key: str) -> str | None:
        for op in self._store.card_operations:
            if op.get("operation_key") == operation_key:
                return str(op["status"])
        return None

    async def hold_left_minor(self, call_sid: str, currency: str) -> int:
        authorised = sum(
            op["amount_minor"]
            for op in self._store.card_operations
            if op["call_sid"] == call_sid
            and op["kind"] == "authorize"
            and op["status"] == "succeeded"
        )
        if not authorised:
            return 0
        return authorised - self._card_money_used_minor(call_sid, currency)

    def _card_money_used_minor(self, call_sid: str, currency: str) -> int:
        receipts = ledger.card_receipts_book(currency)
        transactions = self._store.transactions
        moved = 0
        for entry in transactions.values():
            transaction = entry["transaction"]
            original = transactions.get(transaction.reverses_key or "")
            kinds = {transaction.kind, original and original["transaction"].kind}
            if transaction.call_sid == call_sid and ledger.TransactionKind.MINUTE_CARD in kinds:
                moved += sum(p.amount for p in transaction.postings if p.book == receipts)
        return -moved


class OutboxRepository:
    def __init__(self, store: Store) -> None:
        self._store = store

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
        if request_key in self._store.outbox:
            return False
        self._store.outbox[request_key] = {
            "kind": str(kind),
            "call_sid": call_sid,
            "target_sid": target_sid,
            "argument": argument,
            "created_at": now,
        }
        return True


class Repositories:
    def __init__(self, store: Store) -> None:
        self.calls = CallRepository(store)
        self.accounts = AccountRepository(store)
        self.ledger = LedgerRepository(store)
        self.cards = CardRepository(store)
        self.outbox = OutboxRepository(store)


class FakeRates:
    """A RateBook: the per-minute rate from `effective` moments on (else `default_minor`)."""

    def __init__(self, default_minor: int = 100, changes: dict[dt.datetime, int] | None = None):
        self._default_minor = default_minor
        self._changes = sorted((changes or {}).items())

    async def rate_at(self, connection: Any, kind: Any, currency: str, at: dt.datetime) -> int:
        rate = self._default_minor
        for effective, amount in self._changes:
            if effective <= at:
                rate = amount
        return rate


class FakeCardPayments:
    """CardPayments: a block (or authorisation) or incident is queued as a card operation."""

    def __init__(self, *, available: bool = True, kind: str = "charge") -> None:
        self.available = available
        self._kind = kind

    async def queue_top_up(self, connection: Store, account: Any, call_sid: str) -> None:
        connection.add_card_operation(
            account_id=account.account_id,
            call_sid=call_sid,
            kind=self._kind,
            status="queued",
            amount_minor=3000,
            operation_key=f"call:{call_sid}:top_up:{len(connection.card_operations) + 1}",
        )

    async def queue_incident(
        self, connection: Store, account: Any, call_sid: str, key: str, amount_minor: int
    ) -> None:
        connection.add_card_operation(
            account_id=account.account_id,
            call_sid=call_sid,
            kind="incident",
            status="queued",
            amount_minor=amount_minor,
            operation_key=key,
        )
