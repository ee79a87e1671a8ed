"""Posting a call's minutes: each minute now due, funded by the funding authority, written with
the call's "minutes posted" marker in the same transaction. Used live by the metering tick and
at the end by settlement; both hold the call's lock (`calls_store.lock_call`) while they post.

A minute's idempotency key is `call:<sid>:agent:<id>:minute:<n>`: only the holder of the lock
posts a call's minutes and the marker moves with them, so a key posted twice with other content
means that guarantee broke (`InvariantBroken`).
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from meterd.clock import Clock
from meterd.core import ledger, rating
from meterd.core.rating import Funding, Source
from meterd.core.timeline import Timeline
from meterd.services.errors import InvariantBroken
from meterd.services.funding import FundingAuthority
from meterd.store import ledger_store
from meterd.store.repositories import Repositories, RepositoriesFactory
from meterd.store.transaction import Record, Transaction

# At most this many minutes are posted for one call in one transaction: a call whose backlog is
# larger (a join a day old, a daemon stopped for hours) is caught up in several transactions,
# each short (2-4 ms a minute on SQLite: well under 100 ms), and the tick lets waiting webhooks and
# other calls have the database between them, so nothing is held behind one call's backlog.
MINUTES_PER_TRANSACTION_MAX = 15


class Posted(NamedTuple):
    """What one `post_due_minutes` did: minutes posted, whether more are due than it could
    post, and how many of them nothing could pay (owed, or put on debt)."""

    minutes: int
    backlog: bool
    unpaid: int = 0


class MinutePoster:
    def __init__(
        self,
        clock: Clock,
        funding: FundingAuthority,
        *,
        increment_seconds: int,
        repositories: RepositoriesFactory = Repositories,
    ) -> None:
        self._repositories = repositories
        self._clock = clock
        self._funding = funding
        self._increment_seconds = increment_seconds

    async def post_due_minutes(
        self,
        connection: Transaction,
        call: Record,
        account: Record,
        timeline: Timeline,
        now: dt.datetime,
        *,
        posted: dict[str, int] | None = None,
    ) -> Posted:
        """Post the minutes now due, at most MINUTES_PER_TRANSACTION_MAX. `posted`: the call's
        "minutes posted" marker if the caller read it already (a metering batch reads its
        calls' at once); it is kept up to date here as the marker moves."""
        now_seconds = int(now.timestamp())
        repos = self._repositories(connection)
        if posted is None:
            posted = await repos.calls.minutes_posted(call.call_sid)
        count = unpaid = 0
        increment = self._increment_seconds
        for agent_id, agent_time in sorted(timeline.agents.items()):
            already = posted.get(agent_id, 0)
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
                unpaid += funding.source in (Source.RECEIVABLE, Source.DEBT)
            if target > already:
                await repos.calls.set_minutes_posted(call.call_sid, agent_id, target)
                posted[agent_id] = target
            if target < due:
                return Posted(count, True, unpaid)
        return Posted(count, False, unpaid)

    def minutes_missing(self, timeline: Timeline, posted: dict[str, int]) -> int:
        """Minutes the timeline makes due that are not posted yet, over all agents."""
        increment = self._increment_seconds
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
        connection: Transaction,
        call: Record,
        account: Record,
        agent_id: str,
        n: int,
        funding: Funding,
    ) -> None:
        repos = self._repositories(connection)
        await self._prepare_books(repos, account.account_id, account.currency, funding)
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
            await repos.ledger.post(transaction, self._clock())
        except ledger_store.IdempotencyConflict as error:
            raise InvariantBroken(
                f"minute {transaction.key} was posted before with other "
                f"content while its marker said it was not"
            ) from error

    async def _prepare_books(
        self, repos: Repositories, account_id: str, currency: str, funding: Funding
    ) -> None:
        """An owed minute needs the account's receivable book; a debt minute lets the deposit
        go below zero and flags the account."""
        if funding.source is Source.RECEIVABLE:
            await repos.ledger.open_receivable(account_id, currency)
        elif funding.source is Source.DEBT:
            await repos.ledger.allow_debt(account_id)
