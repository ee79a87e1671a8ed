"""Live metering: each call's timeline, turned into ledger postings as it goes.

The tick (an APScheduler job, every `tick_interval_seconds`, run just after each whole second:
minutes fall due at whole seconds, so one is posted milliseconds after it is due, not up to a
second later) picks the calls whose next minute is due (`calls.next_due_at`), rebuilds each one's
timeline from its recorded events, and posts every minute now due, funded in the plan's order,
together with the "minutes posted" marker (`call_agent_minutes`) in the same database transaction,
so the marker never runs ahead of the ledger and a restart, a second daemon or a `kill -9` neither
loses nor repeats a minute. The due calls share transactions, a batch each (`_meter_batch`): one
commit for many calls. Each minute's idempotency key is `call:<sid>:agent:<id>:minute:<n>`.

A call's row is locked while it is metered (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so a second
daemon moves on to other calls; SQLite's write transaction is exclusive).

Each tick also settles the calls that are ready (`meterd/services/settlement.py`); minutes are
posted by `meterd/services/minute_posting.py`, live and at settlement alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field

from meterd.clock import Clock
from meterd.config import OnExhausted
from meterd.core import rating
from meterd.core.ledger import LedgerError
from meterd.core.plans import Plan
from meterd.core.timeline import Timeline
from meterd.logs import get_logger
from meterd.services.alerts import AlertKind, AlertService
from meterd.services.errors import InvariantBroken
from meterd.services.funding import FundingAuthority
from meterd.services.minute_posting import MinutePoster
from meterd.services.outbox import OutboxKind
from meterd.services.settlement import SettlementService
from meterd.store.calls_store import CallStatus
from meterd.store.database import Database
from meterd.store.outage import is_unavailable
from meterd.store.repositories import Repositories, RepositoriesFactory
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.metering")

# A tick goes on catching up backlogged calls, one transaction per call in turn, for at most this
# long; the next tick carries on (a day of backlog, 1,440 minutes, takes a few seconds).
BACKLOG_SECONDS_PER_TICK = 0.8
# The due calls of a tick are metered in batches of at most this many, one transaction each: one
# commit for all of them, and short enough (a few ms a call) that a webhook waiting for the
# database between two batches waits tens of milliseconds.
BATCH_CALLS_MAX = 16


@dataclass(frozen=True)
class MeteringSettings:
    increment_seconds: int
    research_max_minutes: int
    on_exhausted: OnExhausted
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
    """The live tick: posts each call's minutes as they fall due (`poster`), watches funds,
    ends calls out of funds after the grace period, and settles ended calls (`settlement`)."""

    def __init__(
        self,
        database: Database,
        settings: MeteringSettings,
        clock: Clock,
        funding: FundingAuthority,
        poster: MinutePoster,
        settlement: SettlementService,
        *,
        repositories: RepositoriesFactory = Repositories,
        alerts: AlertService | None = None,
    ) -> None:
        self._alerts = alerts
        self._database = database
        self._settings = settings
        self._clock = clock
        self._funding = funding
        self._poster = poster
        self._settlement = settlement
        self._repositories = repositories

    async def tick(self) -> TickReport:
        """Meter every due call (bounded), request hang-ups after exhaustion, settle calls."""
        report = TickReport()
        now = self._clock()
        async with self._database.read() as connection:
            due = await self._repositories(connection).calls.due(now, self._settings.tick_batch_max)
        if due:
            report.lag_seconds = max(0.0, (now - due[0][1]).total_seconds())
        backlogged: list[str] = []
        waiting = [call_sid for call_sid, _ in due]
        while waiting:
            await asyncio.sleep(0)  # a webhook waiting for the database goes first
            outcomes, waiting = await self._meter_batch(waiting, report.errors)
            for call_sid, (posted, backlog) in outcomes.items():
                report.minutes_posted += posted
                report.calls_metered += 1
                if backlog:
                    backlogged.append(call_sid)
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
        for call_sid in await self._settlement.settleable():
            if await self._settlement.settle_call(call_sid):
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
        outcomes = await self._meter_in_one_transaction([call_sid], only_due=False)
        return outcomes.get(call_sid, (0, False))

    async def _meter_batch(
        self, call_sids: list[str], errors: list[str]
    ) -> tuple[dict[str, tuple[int, bool]], list[str]]:
        """Meter the first BATCH_CALLS_MAX of `call_sids` in one transaction. Each call is
        metered as `_meter_call` would, in the order given (the most overdue first), so the
        batch posts what one transaction per call would. Returns {call: (posted, backlog)} for
        the calls metered and the calls left for the next batch.

        Locks: every call's row first (in sid order; `SKIP LOCKED` on PostgreSQL, so a call
        another daemon holds is skipped, never waited for), then every account's row (in id
        order), so two batches never wait on each other in a circle. A call whose next look is
        in the future now (another daemon metered it since it was listed) is left alone.

        If the batch fails, each of its calls is metered in its own transaction instead, so
        one call's fault holds back no other: that call's error is logged and added to `errors`
        (it is tried again at the next tick). A database outage and a broken money invariant
        are raised as they are (the scheduler's business: wait, or stop the daemon)."""
        batch, rest = call_sids[:BATCH_CALLS_MAX], call_sids[BATCH_CALLS_MAX:]
        try:
            return await self._meter_in_one_transaction(batch, only_due=True), rest
        except Exception as error:
            if _fatal(error):
                raise
            log.warning("a metering batch failed; metering its calls one by one", error=str(error))
        outcomes = {}
        for call_sid in batch:
            try:
                outcomes[call_sid] = await self._meter_call(call_sid)
            except Exception as error:
                if _fatal(error):
                    raise
                log.exception("metering a call failed; trying again next tick", call_sid=call_sid)
                errors.append(f"{call_sid}: {error}")
        return outcomes, rest

    async def _meter_in_one_transaction(
        self, batch: list[str], *, only_due: bool
    ) -> dict[str, tuple[int, bool]]:
        """Meter `batch` in one transaction: {call: (minutes posted, more due)} of the calls
        metered. Everything a call's metering reads first is read for the whole batch at once,
        one statement each: the calls' rows (locked), their accounts' rows (locked), their
        timelines and their "minutes posted" markers. With `only_due`, a call whose next look is
        in the future now (another daemon metered it since the tick listed it) is left alone."""
        outcomes: dict[str, tuple[int, bool]] = {}
        now = self._clock()
        async with self._database.write() as connection:
            repos = self._repositories(connection)
            held = await repos.calls.lock_many(sorted(batch))  # the lock order: calls first
            locked = [
                held[call_sid]
                for call_sid in batch  # due order
                if call_sid in held
                and held[call_sid].settled_at is None
                and not (only_due and _not_due(held[call_sid], now))
            ]
            account_ids = sorted({c.account_id for c in locked if c.account_id is not None})
            accounts = await repos.accounts.lock_many(account_ids) if account_ids else {}
            if missing := set(account_ids) - set(accounts):
                raise InvariantBroken(f"accounts {sorted(missing)} are referenced but do not exist")
            meterable = [c for c in locked if _meterable(c)]
            timelines = await repos.calls.timelines(meterable, now, self._research_max_seconds)
            posted = await repos.calls.minutes_posted_of([c.call_sid for c in meterable])
            for call in locked:
                sid = call.call_sid
                if sid not in timelines:  # not meterable
                    await repos.calls.update(sid, next_due_at=None)
                    outcomes[sid] = (0, False)
                    continue
                outcomes[sid] = await self._meter_locked(
                    connection, call, accounts[call.account_id], timelines[sid], posted[sid], now
                )
        return outcomes

    async def _meter_locked(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        timeline: Timeline,
        posted: dict[str, int],
        now: dt.datetime,
    ) -> tuple[int, bool]:
        """Meter a call whose row (and account's row) this transaction holds, from its timeline
        and its "minutes posted" marker (updated here as minutes are posted)."""
        repos = self._repositories(connection)
        posting = await self._poster.post_due_minutes(
            connection, call, account, timeline, now, posted=posted
        )
        next_due = (
            now  # more minutes are due than one transaction posts: go on at the next tick
            if posting.backlog
            else self._next_due(call, timeline, posted, now)
        )
        await repos.calls.update(call.call_sid, next_due_at=next_due)
        if call.plan == Plan.PER_MINUTE.value and call.waived_at is None:
            await self._watch_funds(connection, call, account, timeline, now, posting.unpaid)
        return posting.minutes, posting.backlog

    async def settle_call(self, call_sid: str) -> bool:
        """Settle the call now if it is ready (see `SettlementService.settle_call`)."""
        return await self._settlement.settle_call(call_sid)

    @property
    def _research_max_seconds(self) -> int:
        return self._settings.research_max_minutes * 60

    def _next_due(
        self, call: Record, timeline: Timeline, posted: dict[str, int], now: dt.datetime
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
        connection: Transaction,
        call: Record,
        account: Record,
        timeline: Timeline,
        now: dt.datetime,
        unpaid_minutes: int,
    ) -> None:
        """With a card on file, the next block (or authorisation) is bought before the minutes
        run out (the funding authority decides, once per account). Without one (or when the
        card failed), under `announce`: warn the conference when few minutes are left, announce
        when they are gone, and end the call `grace_seconds` later (see `_request_hang_ups`).
        Minutes in the grace period are still written (owed). `unpaid_minutes`: of the minutes
        just posted, those nothing could pay."""
        accruing_agents = sum(1 for time in timeline.agents.values() if time.accruing)
        if call.status != CallStatus.CONNECTED or call.conference_sid is None:
            # The caller is gone, but research on the call may run on, or a retroactive research
            # interval add minutes: they are billable and the card on file pays them as it
            # would during the call (one nothing could pay is rebooked onto the block at
            # settlement). Nobody is on the line to hear an announcement.
            if accruing_agents or unpaid_minutes:
                await self._funding.keep_funded(
                    connection, account, call.call_sid, accruing_agents, now
                )
            return
        funds, card_behind = await self._funding.keep_funded(
            connection, account, call.call_sid, accruing_agents, now
        )
        if card_behind:
            return  # a card payment is bought or on its way: nothing to announce
        if self._settings.on_exhausted == OnExhausted.ALLOW_DEBT:
            return
        repos = self._repositories(connection)
        left = funds.minutes_left
        if call.warned_at is None and 0 < left <= self._settings.warn_minutes_left:
            await repos.outbox.enqueue(
                OutboxKind.ANNOUNCE,
                f"call:{call.call_sid}:announce:warn",
                call_sid=call.call_sid,
                target_sid=call.conference_sid,
                argument=self._announcement_url("warn"),
                now=now,
            )
            await repos.calls.update(call.call_sid, warned_at=now)
        if call.exhausted_at is None and left == 0:
            await repos.outbox.enqueue(
                OutboxKind.ANNOUNCE,
                f"call:{call.call_sid}:announce:exhausted",
                call_sid=call.call_sid,
                target_sid=call.conference_sid,
                argument=self._announcement_url("exhausted"),
                now=now,
            )
            await repos.calls.update(call.call_sid, exhausted_at=now)
            if self._alerts is not None:
                data = {"call_sid": call.call_sid, "grace_seconds": self._settings.grace_seconds}
                await self._alerts.record(
                    connection, AlertKind.FUNDS_EXHAUSTED, account.account_id, call.call_sid, data,
                    now,
                )  # fmt: skip
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
        async with self._database.read() as connection:
            due = await self._repositories(connection).calls.grace_over(
                cutoff, self._settings.tick_batch_max
            )
        if not due:
            return 0
        requested = 0
        async with self._database.write() as connection:
            outbox = self._repositories(connection).outbox
            for call_sid in due:
                if await outbox.enqueue(
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


def _not_due(call: Record, now: dt.datetime) -> bool:
    return call.next_due_at is None or call.next_due_at > now


def _meterable(call: Record) -> bool:
    """A call with minutes to meter: one of an account, connected or ended (not yet settled)."""
    return call.account_id is not None and call.status in (CallStatus.CONNECTED, CallStatus.ENDED)


def _fatal(error: Exception) -> bool:
    """Errors a metering batch does not retry call by call: the database is unavailable, or a
    money invariant broke (the scheduler stops the daemon)."""
    return is_unavailable(error) or isinstance(error, InvariantBroken | LedgerError)
