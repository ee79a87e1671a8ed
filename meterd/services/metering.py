"""Live metering and settlement: each call's timeline, turned into ledger postings as it goes.

The tick (an APScheduler job, every `tick_interval_seconds`) picks the calls whose next minute
is due (`calls.next_due_at`), rebuilds each one's timeline from its recorded events, and posts
every minute now due, funded in the plan's order, in one database transaction per call together
with the "minutes posted" marker (`call_agent_minutes`), so the marker never runs ahead of the
ledger and a restart, a second daemon or a `kill -9` neither loses nor repeats a minute. Each
minute's idempotency key is `call:<sid>:agent:<id>:minute:<n>`.

A call's row is locked while it is metered (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so a second
daemon moves on to other calls; SQLite's write transaction is exclusive).

Settlement, once per call, `settle_delay_seconds` after it ended (late webhooks, research begun
after hang-up) and once no research is open: the final timeline from event timestamps decides
each agent's minutes; minutes taken live that it does not support are reversed, missing ones are
posted, per-incident calls are charged, and a waived call has every charge reversed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, and_, exists, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.clock import Clock
from meterd.core import ledger, rating
from meterd.core.ledger import BookKind
from meterd.core.plans import Plan
from meterd.core.rating import Funding, Source
from meterd.core.timeline import Timeline
from meterd.logs import get_logger
from meterd.services.errors import InvariantBroken
from meterd.services.funding import FundingAuthority, lock_account
from meterd.services.outbox import OutboxKind, enqueue
from meterd.services.payments import PaymentService, post_incident
from meterd.services.rates import RateBook, RateKind
from meterd.store import calls_store, ledger_store
from meterd.store.calls_store import CallStatus
from meterd.store.database import Database
from meterd.store.schema import (
    accounts,
    call_agent_minutes,
    calls,
    ledger_books,
    outbox,
    research_marks,
)
from meterd.store.sql import insert_ignoring_conflict

log = get_logger("meterd.metering")

# At most this many minutes are posted for one call in one transaction: a call whose backlog is
# larger (a join a day old, a daemon stopped for hours) is caught up in several transactions,
# each short (2-4 ms a minute on SQLite: well under 100 ms), and the tick lets waiting webhooks and
# other calls have the database between them, so nothing is held behind one call's backlog.
MINUTES_PER_TRANSACTION_MAX = 15
# A tick goes on catching up backlogged calls, one transaction per call in turn, for at most this
# long; the next tick carries on (a day of backlog, 1,440 minutes, takes a few seconds).
BACKLOG_SECONDS_PER_TICK = 0.8


@dataclass(frozen=True)
class MeteringSettings:
    increment_seconds: int
    research_max_minutes: int
    on_exhausted: str  # card, announce or allow_debt
    warn_minutes_left: int
    grace_seconds: int
    settle_delay_seconds: int
    tick_batch_max: int
    public_base_url: str


@dataclass
class TickReport:
    calls_metered: int = 0
    minutes_posted: int = 0
    calls_settled: int = 0
    hang_ups_requested: int = 0
    lag_seconds: float = 0.0  # how late the most overdue call was when the tick began
    errors: list[str] = field(default_factory=list)


class MeteringService:
    def __init__(
        self,
        database: Database,
        settings: MeteringSettings,
        clock: Clock,
        rates: RateBook,
        payments: PaymentService,
        funding: FundingAuthority,
    ) -> None:
        self._database = database
        self._settings = settings
        self._clock = clock
        self._rates = rates
        self._payments = payments
        self._funding = funding

    async def tick(self) -> TickReport:
        """Meter every due call (bounded), request hang-ups after exhaustion, settle calls."""
        report = TickReport()
        now = self._clock()
        async with self._database.read() as connection:
            due = (
                await connection.execute(
                    select(calls.c.call_sid, calls.c.next_due_at)
                    .where(calls.c.next_due_at <= now, calls.c.settled_at.is_(None))
                    .order_by(calls.c.next_due_at)
                    .limit(self._settings.tick_batch_max)
                )
            ).all()
        if due:
            report.lag_seconds = max(0.0, (now - due[0].next_due_at).total_seconds())
        backlogged = []
        for row in due:
            await asyncio.sleep(0)  # a webhook waiting for the database goes first
            posted, backlog = await self._meter_call(row.call_sid)
            report.minutes_posted += posted
            report.calls_metered += 1
            if backlog:
                backlogged.append(row.call_sid)
        deadline = time.monotonic() + BACKLOG_SECONDS_PER_TICK
        while backlogged and time.monotonic() < deadline:
            still = []
            for call_sid in backlogged:
                await asyncio.sleep(0)  # a webhook waiting for the database goes first
                posted, backlog = await self._meter_call(call_sid)
                report.minutes_posted += posted
                if backlog:
                    still.append(call_sid)
            backlogged = still
        report.hang_ups_requested = await self._request_hang_ups()
        for call_sid in await self._settleable():
            if await self.settle_call(call_sid):
                report.calls_settled += 1
        return report

    async def meter_call(self, call_sid: str) -> int:
        """Post the minutes of the call now due (at most MINUTES_PER_TRANSACTION_MAX). Returns
        how many were posted."""
        posted, _ = await self._meter_call(call_sid)
        return posted

    async def _meter_call(self, call_sid: str) -> tuple[int, bool]:
        """One transaction of `meter_call`: how many minutes it posted, and whether more are
        due than it could post."""
        now = self._clock()
        async with self._database.write() as connection:
            call = await _lock_call(connection, call_sid)
            if call is None or call.settled_at is not None:
                return 0, False
            if call.account_id is None or call.status not in (
                CallStatus.CONNECTED,
                CallStatus.ENDED,
            ):
                await calls_store.update_call(connection, call_sid, next_due_at=None)
                return 0, False
            account = await lock_account(connection, call.account_id)
            timeline = await calls_store.load_timeline(
                connection, call, now, self._research_max_seconds
            )
            posted, backlog = await self._post_due_minutes(connection, call, account, timeline, now)
            next_due = (
                now  # more minutes are due than one transaction posts: go on at the next tick
                if backlog
                else self._next_due(
                    call, timeline, await _minutes_posted(connection, call_sid), now
                )
            )
            await calls_store.update_call(connection, call_sid, next_due_at=next_due)
            if call.plan == Plan.PER_MINUTE.value and call.waived_at is None:
                await self._watch_funds(connection, call, account, timeline, now)
        return posted, backlog

    async def settle_call(self, call_sid: str) -> bool:
        """Make the call's ledger equal the rule exactly, once. True if settled now; False if
        it was settled before, is being metered elsewhere, or research on it is still open."""
        now = self._clock()
        async with self._database.write() as connection:
            call = await _lock_call(connection, call_sid)
            if call is None or call.settled_at is not None:
                return False
            if await calls_store.research_open(connection, call_sid, now, self._research_max):
                return False  # started after the call was chosen: settle once it stops
            timeline = await calls_store.load_timeline(
                connection, call, now, self._research_max_seconds
            )
            if call.account_id is not None and call.plan is not None:
                account = await lock_account(connection, call.account_id)
                missing = self._minutes_missing(
                    timeline, await _minutes_posted(connection, call_sid)
                )
                if missing > MINUTES_PER_TRANSACTION_MAX:
                    # catch the backlog up in bounded transactions first; settle after
                    await self._post_due_minutes(connection, call, account, timeline, now)
                    return False
                # give back first, so minutes given back to the bank can pay for missing ones
                bank_returned = await self._reverse_unsupported_minutes(connection, call, timeline)
                await self._post_due_minutes(connection, call, account, timeline, now)
                if call.plan == Plan.PER_MINUTE.value:
                    await self._pay_from_bank_first(connection, call, bank_returned, now)
                if call.plan == Plan.PER_INCIDENT.value and call.waived_at is None:
                    await self._charge_incidents(connection, call, account, timeline)
                # card: capture what was used, release the rest; a waived call (or one that
                # never connected) has every charge given back
                await self._payments.queue_settlement(connection, call)
            await calls_store.update_call(connection, call_sid, settled_at=now, next_due_at=None)
        log.info("call settled", call_sid=call_sid)
        return True

    @property
    def _research_max_seconds(self) -> int:
        return self._settings.research_max_minutes * 60

    @property
    def _research_max(self) -> dt.timedelta:
        return dt.timedelta(seconds=self._research_max_seconds)

    async def _post_due_minutes(
        self,
        connection: AsyncConnection,
        call: Row[Any],
        account: Row[Any],
        timeline: Timeline,
        now: dt.datetime,
    ) -> tuple[int, bool]:
        """Post the minutes now due, at most MINUTES_PER_TRANSACTION_MAX. Returns how many
        were posted and whether more are due."""
        now_seconds = int(now.timestamp())
        posted_by_agent = await _minutes_posted(connection, call.call_sid)
        count = 0
        increment = self._settings.increment_seconds
        for agent_id, agent_time in sorted(timeline.agents.items()):
            already = posted_by_agent.get(agent_id, 0)
            due = rating.minutes_due_live(
                agent_time.billable_seconds, agent_time.accruing, increment
            )
            target = min(due, already + MINUTES_PER_TRANSACTION_MAX - count)
            for n in range(already + 1, target + 1):
                due_at_seconds = rating.minute_due_at_seconds(agent_time.billable, n, increment)
                if due_at_seconds is None:
                    # due because time is running and reaches its threshold now
                    due_at_seconds = max(
                        [now_seconds, *(i.end_seconds for i in agent_time.billable)]
                    )
                due_at = dt.datetime.fromtimestamp(due_at_seconds, dt.UTC)
                funding = await self._funding.fund_minute(connection, account, call, due_at)
                await self._post_minute(connection, call, account, agent_id, n, funding)
                count += 1
            if target > already:
                await _set_minutes_posted(connection, call.call_sid, agent_id, target)
            if target < due:
                return count, True
        return count, False

    def _minutes_missing(self, timeline: Timeline, posted: dict[str, int]) -> int:
        """Minutes the timeline makes due that are not posted yet, over all agents."""
        increment = self._settings.increment_seconds
        return sum(
            max(
                0,
                rating.minutes_due_live(t.billable_seconds, t.accruing, increment)
                - posted.get(a, 0),
            )
            for a, t in timeline.agents.items()
        )

    async def _post_minute(
        self,
        connection: AsyncConnection,
        call: Row[Any],
        account: Row[Any],
        agent_id: str,
        n: int,
        funding: Funding,
    ) -> None:
        await self._prepare_books(connection, account.account_id, account.currency, funding)
        transaction = ledger.minute(
            call.call_sid,
            agent_id,
            n,
            account_id=account.account_id,
            currency=account.currency,
            source=funding.source.value,
            amount_minor=funding.amount_minor,
        )
        try:
            await ledger_store.post(connection, transaction, self._clock())
        except ledger_store.IdempotencyConflict as error:
            # Only the holder of the call's lock posts its minutes, and the marker moves in the
            # same transaction: a clash means that guarantee broke.
            raise InvariantBroken(
                f"minute {transaction.key} was posted before with other "
                f"content while its marker said it was not"
            ) from error

    async def _prepare_books(
        self, connection: AsyncConnection, account_id: str, currency: str, funding: Funding
    ) -> None:
        if funding.source is Source.RECEIVABLE:
            await ledger_store.create_book(
                connection,
                ledger.receivable_book(account_id),
                unit=currency,
                kind=BookKind.RECEIVABLE,
                account_id=account_id,
                allow_negative=True,
            )
        elif funding.source is Source.DEBT:
            await connection.execute(
                update(ledger_books)
                .where(ledger_books.c.book == ledger.deposit_book(account_id))
                .values(allow_negative=True)
            )
            await connection.execute(
                update(accounts)
                .where(accounts.c.account_id == account_id, ~accounts.c.debt_flagged)
                .values(debt_flagged=True)
            )

    async def _reverse_unsupported_minutes(
        self, connection: AsyncConnection, call: Row[Any], timeline: Timeline
    ) -> list[int]:
        """Give back minutes taken live that the final timeline does not support. Returns the
        transaction ids of the banked minutes among them (their minutes went back to the bank)."""
        bank_returned: list[int] = []
        for agent_id, posted in (await _minutes_posted(connection, call.call_sid)).items():
            time = timeline.agents.get(agent_id)
            final = (
                0
                if time is None
                else rating.minutes_due(time.billable_seconds, self._settings.increment_seconds)
            )
            for n in range(final + 1, posted + 1):
                key = ledger.minute_key(call.call_sid, agent_id, n)
                original = await ledger_store.load_transaction(connection, key)
                if original is None:
                    raise InvariantBroken(
                        f"minute {n} of {agent_id} on {call.call_sid} is "
                        f"counted as posted but is not in the ledger"
                    )
                result = await ledger_store.post(
                    connection,
                    ledger.reversal_of(
                        original, memo="settlement: not supported by the final timeline"
                    ),
                    self._clock(),
                )
                if original.kind == "minute_bank" and not result.replayed:
                    bank_returned.append(await ledger_store.transaction_id(connection, key))
            if final < posted:  # only ever lowered here; missing minutes are posted after
                log.info(
                    "settlement corrected live minutes",
                    call_sid=call.call_sid,
                    agent_id=agent_id,
                    live=posted,
                    final=final,
                )
                await _set_minutes_posted(connection, call.call_sid, agent_id, final)
        return bank_returned

    async def _pay_from_bank_first(
        self,
        connection: AsyncConnection,
        call: Row[Any],
        bank_returned: list[int],
        now: dt.datetime,
    ) -> None:
        """Live, a minute may have been paid with money while the bank was empty only because
        an earlier minute, taken on a late leave event, held a banked minute that settlement
        has just given back. The final word follows the funding order: each such money-paid
        minute (posted after a given-back banked minute, matched one to one) is rebooked onto
        the bank, while the bank holds minutes. A money-paid minute posted before any of them
        rightly paid from the deposit and stays."""
        bank_book = ledger.bank_book(call.account_id)
        bank = (await ledger_store.balances(connection, [bank_book])).get(bank_book, 0)
        if bank <= 0:
            return
        held_back = sorted(bank_returned)
        rebook: list[str] = []
        for key in await ledger_store.unreversed_keys(
            connection, call.call_sid, ledger.MONEY_MINUTE_KINDS
        ):
            paid_id = await ledger_store.transaction_id(connection, key)
            if held_back and held_back[0] < paid_id and len(rebook) < bank:
                held_back.pop(0)
                rebook.append(key)
        # minutes nothing could pay when they fell due (owed, or debt) are paid from the bank
        # once it holds minutes again, e.g. the block bought because they could not be paid
        for key in await ledger_store.unreversed_keys(
            connection, call.call_sid, frozenset({"minute_receivable", "minute_debt"})
        ):
            if key not in rebook and len(rebook) < bank:
                rebook.append(key)
        for key in rebook:
            original = await ledger_store.load_transaction(connection, key)
            if original is None:
                raise InvariantBroken(f"{key} is listed but not in the ledger")
            await ledger_store.post(
                connection,
                ledger.reversal_of(original, memo="settlement: paid from the bank instead"),
                now,
            )
            agent_id, n = ledger.parse_minute_key(key)
            await ledger_store.post(
                connection,
                ledger.minute(
                    call.call_sid,
                    agent_id,
                    n,
                    account_id=call.account_id,
                    currency="",
                    source="bank",
                    amount_minor=0,
                    rebooked=True,
                ),
                now,
            )

    async def _charge_incidents(
        self, connection: AsyncConnection, call: Row[Any], account: Row[Any], timeline: Timeline
    ) -> None:
        """Per incident: one incident per started 2 hours of billable time, shared by an
        incident's linked follow-up calls (a waived call's time no longer counts), at the price
        in force when the call ended; from the deposit, else the card on file, else owed."""
        group = call.incident_group or call.call_sid
        group_seconds = timeline.billable_union_seconds
        settled_members = (
            await connection.execute(
                select(calls).where(
                    (calls.c.incident_group == group) | (calls.c.call_sid == group),
                    calls.c.call_sid != call.call_sid,
                    calls.c.settled_at.is_not(None),
                    calls.c.waived_at.is_(None),
                )
            )
        ).all()
        for member in settled_members:
            member_timeline = await calls_store.load_timeline(
                connection, member, member.settled_at, self._research_max_seconds
            )
            group_seconds += member_timeline.billable_union_seconds
        needed = rating.incidents_due(group_seconds)
        completed_at = call.ended_at or self._clock()
        price = await self._rates.rate_at(
            connection, RateKind.INCIDENT, account.currency, completed_at
        )
        if price == 0:
            return
        # The group's incidents so far: keys incident:<group>:1, 2, ... A key is used once
        # (charged, on its way to the card, or given back by a waiver); one given back no
        # longer counts, so a later call of the group charges the next free key instead.
        charged, free_k = 0, 1
        while True:
            key = ledger.incident_key(group, free_k)
            posted = await ledger_store.load_transaction(connection, key) is not None
            if posted:
                charged += 0 if await ledger_store.is_reversed(connection, key) else 1
            elif await self._payments.operation_status(connection, key) in ("queued", "sent"):
                charged += 1
            elif await self._payments.operation_status(connection, key) is None:
                break
            free_k += 1
        for k in range(free_k, free_k + max(needed - charged, 0)):
            key = ledger.incident_key(group, k)
            payer = await self._funding.incident_payer(
                connection, account, call.call_sid, key, price
            )
            if payer is None:
                continue  # the card is charged next; the incident is posted when it succeeds
            await post_incident(
                connection,
                key,
                call_sid=call.call_sid,
                account_id=call.account_id,
                currency=account.currency,
                payer=payer,
                amount_minor=price,
                now=self._clock(),
            )

    def _next_due(
        self, call: Row[Any], timeline: Timeline, posted: dict[str, int], now: dt.datetime
    ) -> dt.datetime | None:
        """The next time the tick must look at the call: when its next minute falls due if
        billable time keeps running; and, while it is connected or has research open, no later
        than one increment from now (a heartbeat: funds are watched, and a state the events
        have not told us about yet cannot stall it)."""
        now_seconds = int(now.timestamp())
        candidates = [
            rating.next_minute_due_at_seconds(
                billable_seconds=time.billable_seconds,
                accruing=time.accruing,
                minutes_posted=posted.get(agent_id, 0),
                increment_seconds=self._settings.increment_seconds,
                now_seconds=now_seconds,
            )
            for agent_id, time in timeline.agents.items()
        ]
        due = [c for c in candidates if c is not None]
        live = call.status == CallStatus.CONNECTED or any(
            time.accruing for time in timeline.agents.values()
        )
        if live:
            due.append(now_seconds + self._settings.increment_seconds)
        return dt.datetime.fromtimestamp(min(due), dt.UTC) if due else None

    async def _watch_funds(
        self,
        connection: AsyncConnection,
        call: Row[Any],
        account: Row[Any],
        timeline: Timeline,
        now: dt.datetime,
    ) -> None:
        """With a card on file, the next block (or authorisation) is bought before the minutes
        run out (the funding authority decides, once per account). Without one (or when the
        card failed), under `announce`: warn the conference when few minutes are left, announce
        when they are gone, and end the call `grace_seconds` later (see `_request_hang_ups`).
        Minutes in the grace period are still written (owed)."""
        if call.status != CallStatus.CONNECTED or call.conference_sid is None:
            return
        accruing_agents = sum(1 for time in timeline.agents.values() if time.accruing)
        funds, card_behind = await self._funding.keep_funded(
            connection, account, call.call_sid, accruing_agents, now
        )
        if card_behind:
            return  # a card payment is bought or on its way: nothing to announce
        if self._settings.on_exhausted == "allow_debt":
            return
        left = funds.minutes_left
        if call.warned_at is None and 0 < left <= self._settings.warn_minutes_left:
            await enqueue(
                connection,
                OutboxKind.ANNOUNCE,
                f"call:{call.call_sid}:announce:warn",
                call_sid=call.call_sid,
                target_sid=call.conference_sid,
                argument=self._announcement_url("warn"),
                now=now,
            )
            await calls_store.update_call(connection, call.call_sid, warned_at=now)
        if call.exhausted_at is None and left == 0:
            await enqueue(
                connection,
                OutboxKind.ANNOUNCE,
                f"call:{call.call_sid}:announce:exhausted",
                call_sid=call.call_sid,
                target_sid=call.conference_sid,
                argument=self._announcement_url("exhausted"),
                now=now,
            )
            await calls_store.update_call(connection, call.call_sid, exhausted_at=now)
            log.info(
                "funds exhausted; the call ends after the grace period",
                call_sid=call.call_sid,
                grace_seconds=self._settings.grace_seconds,
            )

    def _announcement_url(self, message: str) -> str:
        return f"{self._settings.public_base_url}/twilio/announcement?message={message}"

    async def _request_hang_ups(self) -> int:
        """Calls whose grace period after exhaustion is over are ended (once)."""
        now = self._clock()
        cutoff = now - dt.timedelta(seconds=self._settings.grace_seconds)
        already = exists().where(outbox.c.request_key == "call:" + calls.c.call_sid + ":hang_up")
        async with self._database.read() as connection:
            due = (
                await connection.scalars(
                    select(calls.c.call_sid)
                    .where(
                        calls.c.exhausted_at <= cutoff,
                        calls.c.status == CallStatus.CONNECTED,
                        calls.c.waived_at.is_(None),
                        ~already,
                    )
                    .limit(self._settings.tick_batch_max)
                )
            ).all()
        if not due:
            return 0
        requested = 0
        async with self._database.write() as connection:
            for call_sid in due:
                if await enqueue(
                    connection,
                    OutboxKind.HANG_UP,
                    f"call:{call_sid}:hang_up",
                    call_sid=call_sid,
                    target_sid=call_sid,
                    argument="",
                    now=now,
                ):
                    requested += 1
                    log.info("grace period over; asking Twilio to end the call", call_sid=call_sid)
        return requested

    async def _settleable(self) -> list[str]:
        now = self._clock()
        cutoff = now - dt.timedelta(seconds=self._settings.settle_delay_seconds)
        research_cap = now - dt.timedelta(seconds=self._research_max_seconds)
        open_research = exists().where(
            and_(
                research_marks.c.call_sid == calls.c.call_sid,
                research_marks.c.end_at.is_(None),
                research_marks.c.start_at > research_cap,
            )
        )
        async with self._database.read() as connection:
            rows = await connection.scalars(
                select(calls.c.call_sid)
                .where(
                    calls.c.settled_at.is_(None),
                    calls.c.ended_at <= cutoff,
                    calls.c.status.in_((CallStatus.ENDED, CallStatus.REJECTED)),
                    ~open_research,
                )
                .order_by(calls.c.ended_at)
                .limit(self._settings.tick_batch_max)
            )
            return list(rows.all())


async def _lock_call(connection: AsyncConnection, call_sid: str) -> Row[Any] | None:
    query = select(calls).where(calls.c.call_sid == call_sid)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return (await connection.execute(query)).one_or_none()


async def _minutes_posted(connection: AsyncConnection, call_sid: str) -> dict[str, int]:
    rows = await connection.execute(
        select(call_agent_minutes.c.agent_id, call_agent_minutes.c.minutes_posted).where(
            call_agent_minutes.c.call_sid == call_sid
        )
    )
    return {row.agent_id: row.minutes_posted for row in rows}


async def _set_minutes_posted(
    connection: AsyncConnection, call_sid: str, agent_id: str, minutes: int
) -> None:
    await connection.execute(
        insert_ignoring_conflict(
            connection,
            call_agent_minutes,
            {"call_sid": call_sid, "agent_id": agent_id, "minutes_posted": 0},
            ["call_sid", "agent_id"],
        )
    )
    await connection.execute(
        update(call_agent_minutes)
        .where(call_agent_minutes.c.call_sid == call_sid, call_agent_minutes.c.agent_id == agent_id)
        .values(minutes_posted=minutes)
    )
