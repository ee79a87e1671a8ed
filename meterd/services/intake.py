"""Taking Twilio's conference and call-status callbacks even while the database cannot.

A callback answered 2xx must never be lost: Twilio does not retry a status callback that got an
answer, and a lost join, hold or hang-up is a wrong bill. So each callback is first offered to the
database, through the writer that group-commits every callback waiting (`IngestWriter`,
`meterd/services/ingest_writer.py`), and answered once the commit that holds it is done; if the
database fails with an outage, or does not answer within `webhook_journal_wait_ms`, the callback
goes to the local webhook journal (fsync'd) and is answered 2xx all the same. When the writer's
queue is full the callback is refused with a 503 (Twilio retries it), not journaled: the journal
is for a database that cannot take callbacks, not for one that is merely behind.

The journal is applied in order as soon as the database is back, by the metering job before it
meters anything, so no minute is posted from a timeline that misses a journaled event. While the
journal holds entries, newer callbacks join its end rather than overtake it.

A callback that the database refuses on replay (its call unknown, a time outside the call) is
logged and dropped, as its 4xx would have been: Twilio would not have retried a 4xx either.
`/twilio/voice` cannot be journaled (its answer depends on the account): it apologises instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from meterd.clock import Clock
from meterd.logs import get_logger
from meterd.services.errors import ServiceError
from meterd.services.ingest import Callback, IngestService, Recorded
from meterd.services.ingest_writer import IngestWriter
from meterd.store.journal import JournalEntry, WebhookJournal
from meterd.store.outage import OutageLog, describe, is_unavailable

log = get_logger("meterd.intake")

REPLAY_RETRY_SECONDS = 1.0
JOURNAL_HEADROOM_BYTES = 16 * 1024  # room for one more callback (bodies are at most 64 KiB)


class WebhookIntake:
    def __init__(
        self,
        ingest: IngestService,
        writer: IngestWriter,
        journal: WebhookJournal,
        clock: Clock,
        outage: OutageLog,
        *,
        wait_seconds: float,
        registry: CollectorRegistry,
        batch_max: int = 256,
    ) -> None:
        self._ingest = ingest
        self._writer = writer
        self._journal = journal
        self._clock = clock
        self._outage = outage
        self._wait_seconds = wait_seconds
        self._batch_max = batch_max  # journal entries applied in one transaction
        self._replaying = asyncio.Lock()
        self._late: set[asyncio.Future[Recorded]] = set()  # offers written after the bound
        self.depth_gauge = Gauge(
            "meterd_webhook_journal_entries",
            "callbacks in the webhook journal not yet applied to the database",
            registry=registry,
        )
        self.oldest_age_gauge = Gauge(
            "meterd_webhook_journal_oldest_age_seconds",
            "how long the oldest callback in the webhook journal has waited (0: none)",
            registry=registry,
        )
        self.journaled = Counter(
            "meterd_webhook_journal_appended",
            "callbacks written to the webhook journal, by why (outage, slow, behind: "
            "older ones were still journaled)",
            ["reason"],
            registry=registry,
        )
        self.replays = Counter(
            "meterd_webhook_journal_replays",
            "journaled callbacks applied to the database, by outcome (applied, refused)",
            ["outcome"],
            registry=registry,
        )
        self.depth_gauge.set_function(lambda: self._journal.depth)
        self.oldest_age_gauge.set_function(self.oldest_age_seconds)

    @property
    def writer(self) -> IngestWriter:
        """The writer that group-commits the callbacks offered to the database."""
        return self._writer

    @property
    def journaling(self) -> bool:
        """True while the journal holds callbacks the database has not taken yet."""
        return self._journal.depth > 0

    def refuse_if_full(self, route: str) -> None:
        """Raise QueueFull if a callback of `route` offered now would be refused because too
        many wait for the database already. While the journal holds callbacks, new ones go
        behind them there, not to the writer: nothing is refused for the writer's sake."""
        if not self.journaling:
            self._writer.refuse_if_full(route)

    @property
    def journal_entries(self) -> int:
        return self._journal.depth

    @property
    def can_journal(self) -> bool:
        """False once the journal is (nearly) full: callbacks would get 503."""
        return self._journal.size_bytes + JOURNAL_HEADROOM_BYTES <= self._journal.bytes_max

    def oldest_age_seconds(self) -> float:
        pending = self._journal.pending
        if not pending:
            return 0.0
        return max(0.0, (self._clock() - pending[0].received_at).total_seconds())

    async def take(self, route: str, form: Mapping[str, str], params: list[tuple[str, str]]) -> str:
        """Record a signed, well-formed callback of `route` ("conference" or "call-status"):
        in the database ("applied", after the writer's commit that holds it) or in the journal
        ("journaled"). Raises what the database refused it for (ServiceError, a 4xx),
        QueueFull (a 503: the writer has too many waiting) and JournalFull (a 503)."""
        received_at = self._clock()
        if self.journaling:  # older callbacks wait there: this one must not overtake them
            await self._append(route, params, received_at, "behind")
            return "journaled"
        ticket = self._writer.submit(Callback(route, form, params, received_at))
        done, _ = await asyncio.wait({ticket.future}, timeout=self._wait_seconds)
        if not done:
            # Still waiting on the database. A callback the writer has not taken yet is
            # withdrawn; one being written finishes on its own (a dedup key makes the replay of
            # the journaled copy a no-op if it does). Answer from the journal.
            if not ticket.withdraw():
                self._late.add(ticket.future)
                ticket.future.add_done_callback(self._late_offer_done)
            await self._append(route, params, received_at, "slow")
            return "journaled"
        try:
            ticket.future.result()
        except ServiceError:
            raise
        except Exception as error:
            if not is_unavailable(error):
                raise
            self._outage.failure(f"webhook:{route}", error)
            await self._append(route, params, received_at, "outage")
            return "journaled"
        return "applied"

    def start(self) -> None:
        """Start the writer (the daemon's lifecycle, as it starts the services)."""
        self._writer.start()

    async def stop(self, timeout_seconds: float) -> None:
        """Once no request is left: the writer records what it holds, then ends."""
        await self._writer.stop(timeout_seconds)

    def _late_offer_done(self, offer: asyncio.Future[Recorded]) -> None:
        self._late.discard(offer)
        error = None if offer.cancelled() else offer.exception()
        if error is not None:
            log.info(
                "a slow callback failed after it was journaled; the journal applies it",
                **describe(error),
            )

    async def _append(
        self, route: str, params: list[tuple[str, str]], received_at: dt.datetime, reason: str
    ) -> None:
        await self._journal.append(route, params, received_at)
        self.journaled.labels(reason).inc()
        if self._journal.depth == 1:
            log.warning(
                "journaling webhooks: the database cannot take them now",
                reason=reason,
                journal=str(self._journal.path),
            )

    async def replay(self) -> int:
        """Apply the journal to the database, oldest first, up to `batch_max` entries a
        transaction; stop at an outage (the next run resumes). Returns how many entries were
        applied or refused."""
        done = 0
        async with self._replaying:
            while pending := self._journal.pending:
                applied, whole = await self._replay_batch(pending[: self._batch_max])
                done += applied
                if not whole:
                    return done
            if done:
                log.info("webhook journal applied; taking webhooks directly again", entries=done)
        return done

    async def _replay_batch(self, entries: list[JournalEntry]) -> tuple[int, bool]:
        """Apply `entries` in one transaction, then mark them applied with one write. Returns
        how many were, and whether all were (False: the database failed; the rest wait)."""
        callbacks = [Callback(e.route, dict(e.params), e.params, e.received_at) for e in entries]
        try:
            outcomes = await self._ingest.record_batch(callbacks)
        except Exception as error:
            if is_unavailable(error):
                self._outage.failure("webhook-journal-replay", error)
                return 0, False
            if len(entries) > 1:  # one entry's fault must not hold the others: one at a time
                done = 0
                for entry in entries:
                    applied, whole = await self._replay_batch([entry])
                    done += applied
                    if not whole:
                        return done, False
                return done, True
            log.exception(
                "applying a journaled webhook failed; retrying",
                route=entries[0].route,
                entry_id=entries[0].entry_id,
            )
            return 0, False
        for entry, outcome in zip(entries, outcomes, strict=True):
            if isinstance(outcome, ServiceError):
                log.warning(
                    "journaled webhook refused by the database; dropped as its 4xx would have been",
                    route=entry.route,
                    entry_id=entry.entry_id,
                    error=outcome.code,
                    detail=outcome.detail,
                )
                self.replays.labels("refused").inc()
            else:
                self.replays.labels("applied").inc()
        await self._journal.mark_applied(entries)  # one write for the batch
        return len(entries), True

    async def wait_for_late_offers(self) -> None:
        """For a clean stop: let offers still talking to the database finish."""
        if self._late:
            await asyncio.wait(set(self._late), timeout=REPLAY_RETRY_SECONDS)
