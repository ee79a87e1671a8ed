"""Settlement: once per call, `settle_delay_seconds` after it ended (late webhooks, research
begun after hang-up) and once no research is open, the final timeline from Twilio's event
timestamps decides each agent's minutes. Minutes taken live that it does not support are given
back, missing ones are posted, money-paid minutes the bank could have paid are rebooked onto it,
per-incident calls are charged, and the card's holds are settled (a waived call has every
charge given back).
"""

from __future__ import annotations

import asyncio
import datetime as dt

from meterd.clock import Clock
from meterd.core import ledger, rating
from meterd.core.plans import Plan
from meterd.core.timeline import Timeline
from meterd.logs import get_logger
from meterd.services.call_shares import CallShares
from meterd.services.errors import InvariantBroken
from meterd.services.funding import FundingAuthority, lock_account
from meterd.services.funding_order import FundingOrder
from meterd.services.given_back import GivenBack
from meterd.services.minute_posting import MINUTES_PER_TRANSACTION_MAX, MinutePoster
from meterd.services.payments import PaymentService, post_incident
from meterd.services.rates import RateBook, RateKind
from meterd.store import calls_store, ledger_store, timeline_store
from meterd.store.database import Database
from meterd.store.repositories import Repositories, RepositoriesFactory
from meterd.store.transaction import Record, Transaction

log = get_logger("meterd.settlement")

# Settling a call posts its backlog first, one bounded transaction at a time: at most this many
# (15,000 minutes, ten days of one agent); past it the next tick carries on.
CATCH_UP_TRANSACTIONS_MAX = 1000
_SETTLED, _NOT_SETTLED, _BACKLOG = object(), object(), object()


class SettlementService:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        rates: RateBook,
        payments: PaymentService,
        funding: FundingAuthority,
        poster: MinutePoster,
        *,
        increment_seconds: int,
        research_max_minutes: int,
        settle_delay_seconds: int,
        batch_max: int,
        repositories: RepositoriesFactory = Repositories,
    ) -> None:
        self._repositories = repositories
        self._database = database
        self._clock = clock
        self._rates = rates
        self._payments = payments
        self._funding = funding
        self._funding_order = FundingOrder(rates, funding, increment_seconds=increment_seconds)
        self._call_shares = CallShares(
            rates,
            increment_seconds=increment_seconds,
            research_max_seconds=research_max_minutes * 60,
        )
        self._poster = poster
        self._increment_seconds = increment_seconds
        self._research_max_seconds = research_max_minutes * 60
        self._research_max = dt.timedelta(seconds=self._research_max_seconds)
        self._settle_delay_seconds = settle_delay_seconds
        self._batch_max = batch_max

    async def settle_call(self, call_sid: str) -> bool:
        """Make the call's ledger equal the rule exactly, once. True if settled now; False if
        it was settled before, is being metered elsewhere, or research on it is still open.

        A backlog of minutes not yet posted (a long call delivered at once, a daemon that was
        down) is posted first, MINUTES_PER_TRANSACTION_MAX at a time, letting waiting webhooks
        in between; then the call is settled in one transaction."""
        for _ in range(CATCH_UP_TRANSACTIONS_MAX):
            outcome = await self._settle_once(call_sid)
            if outcome is not _BACKLOG:
                return outcome is _SETTLED
            await asyncio.sleep(0)  # a webhook waiting for the database goes first
        return False  # a backlog larger than this: the next tick carries on

    async def _settle_once(self, call_sid: str) -> object:
        now = self._clock()
        async with self._database.write() as connection:
            call = await calls_store.lock_call(connection, call_sid)
            if call is None or call.settled_at is not None:
                return _NOT_SETTLED
            if await calls_store.research_open(connection, call_sid, now, self._research_max):
                return _NOT_SETTLED  # started after the call was chosen: settle once it stops
            timeline = await timeline_store.load_timeline(
                connection, call, now, self._research_max_seconds
            )
            if call.account_id is not None and call.plan is not None:
                account = await lock_account(connection, call.account_id)
                missing = self._poster.minutes_missing(
                    timeline, await calls_store.minutes_posted(connection, call_sid)
                )
                if missing > MINUTES_PER_TRANSACTION_MAX:
                    await self._poster.post_due_minutes(connection, call, account, timeline, now)
                    return _BACKLOG
                # give back first, so minutes given back to the bank can pay for missing ones
                given_back = await self._reverse_unsupported_minutes(connection, call, timeline)
                await self._poster.post_due_minutes(connection, call, account, timeline, now)
                if call.plan == Plan.PER_MINUTE.value:
                    await self._funding_order.apply(
                        connection, call, account, timeline, given_back, now
                    )
                    await self._call_shares.apply(connection, call, account, timeline, now)
                if call.plan == Plan.PER_INCIDENT.value and call.waived_at is None:
                    await self._charge_incidents(connection, call, account, timeline)
                # card: capture what was used, release the rest; a waived call (or one that
                # never connected) has every charge given back
                await self._payments.queue_settlement(connection, call)
            await calls_store.update_call(connection, call_sid, settled_at=now, next_due_at=None)
        log.info("call settled", call_sid=call_sid)
        return _SETTLED

    async def _reverse_unsupported_minutes(
        self, connection: Transaction, call: Record, timeline: Timeline
    ) -> GivenBack:
        """Give back minutes taken live that the final timeline does not support. Returns the
        banked and deposit-paid minutes among them (their minutes went back to the bank, their
        money to the deposit)."""
        given_back = GivenBack()
        posted_by_agent = await calls_store.minutes_posted(connection, call.call_sid)
        for agent_id, posted in posted_by_agent.items():
            time = timeline.agents.get(agent_id)
            final = (
                0
                if time is None
                else rating.minutes_due(time.billable_seconds, self._increment_seconds)
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
                if not result.replayed:
                    await given_back.add(connection, original, call.account_id)
            if final < posted:  # only ever lowered here; missing minutes are posted after
                log.info(
                    "settlement corrected live minutes",
                    call_sid=call.call_sid,
                    agent_id=agent_id,
                    live=posted,
                    final=final,
                )
                await calls_store.set_minutes_posted(connection, call.call_sid, agent_id, final)
        return given_back

    async def _charge_incidents(
        self, connection: Transaction, call: Record, account: Record, timeline: Timeline
    ) -> None:
        """Per incident: one incident per started 2 hours of billable time, shared by an
        incident's linked follow-up calls (a waived call's time no longer counts), at the price
        in force when the call ended; from the deposit, else the card on file, else owed."""
        group = call.incident_group or call.call_sid
        group_seconds = timeline.billable_union_seconds
        settled_members = await self._repositories(connection).calls.settled_in_incident(
            group, other_than=call.call_sid
        )
        for member in settled_members:
            member_timeline = await timeline_store.load_timeline(
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

    async def settleable(self) -> list[str]:
        """Calls ready to settle: ended `settle_delay_seconds` ago, no research open."""
        now = self._clock()
        cutoff = now - dt.timedelta(seconds=self._settle_delay_seconds)
        research_cap = now - dt.timedelta(seconds=self._research_max_seconds)
        async with self._database.read() as connection:
            return await self._repositories(connection).calls.settleable(
                ended_by=cutoff, research_opened_after=research_cap, limit=self._batch_max
            )
