"""The nightly usage for finance (docs/billing.md, Nightly usage; issue 6).

A closed business day's report is built from the database, checked, written atomically under
`<state_dir>/usage/` and recorded once in `usage_runs`:

    <day>.csv         one row per account        GET /finance/usage/<day>.csv
    <day>.json        the same, with totals      GET /finance/usage/<day>.json
    <day>.calls.csv   one row per call and day   GET /finance/usage/<day>/calls.csv

What the rows count, and the reconciliation, are decided in `meterd.core.usage` (its modules'
docstrings). Here the jobs; the lease on a day is `usage_lease`, the build `usage_build`, the
files `usage_publish`, the queries `meterd.store.usage_store`. Decisions:

- **Closed.** A day is reported once it ended `CLOSE_MARGIN_SECONDS` ago, so that a write
  transaction stamped just before midnight has committed. `usage_cron` (default 00:30) must fall
  after that margin; a run before it finds yesterday not closed and leaves it to the next run.
- **Once.** A run claims its day before building (`usage_lease`); a day being built elsewhere is
  left to its builder. The nightly job and the job at start both run `catch_up`: every closed
  day without a published report, from the earliest posting or run (at most `CATCH_UP_DAYS_MAX`
  days back; older days: `meterd usage --date`), oldest first. So a restart or missed nights are
  caught up, and two daemons produce each day once.
- **Checked.** Before building, the whole ledger passes `meterd ledger check`'s invariants
  (reused: `check_ledger`); a breach refuses the report, records why, logs a critical alert and
  raises `LedgerBroken`, an `InvariantBroken`, which stops the daemon like any broken money
  invariant. Then every account reconciles and the calls file adds up to the accounts file
  (`usage_build`); if not, the day is refused (recorded, alerted, retried next run) and nothing
  is published.
- **Atomic, reproducible files.** The files are put in place atomically (`usage_publish`)
  before the run is recorded as published with the files' SHA-256. A file depends only on the
  database, so any daemon can rebuild a day: when a file is missing here (another daemon built
  it) or damaged, it is rebuilt and must hash to what was published (`UsageMismatch` if not).
  A day published before the calls file had its last column, `direction`, is rebuilt without
  it (`render.CALL_COLUMNS_BEFORE_DIRECTION`): a published file never changes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meterd.clock import Clock
from meterd.config import Settings
from meterd.core.usage.business_days import business_day_of, day_bounds, last_closed_day
from meterd.core.usage.reconciliation import UsageDoesNotReconcile
from meterd.core.usage.render import CALL_COLUMNS, CALL_COLUMNS_BEFORE_DIRECTION, Columns, iso_utc
from meterd.logs import get_logger
from meterd.services.errors import InvariantBroken
from meterd.services.ledger_check import CheckReport, check_ledger
from meterd.services.usage_build import UsageBuilder
from meterd.services.usage_lease import LEASE_SECONDS, UsageLease
from meterd.services.usage_publish import BuiltFiles, UsageFile, sha256_of
from meterd.store import usage_store
from meterd.store.database import Database
from meterd.store.transaction import Record
from meterd.store.usage_store import RunStatus

__all__ = [
    "CATCH_UP_DAYS_MAX",
    "CLOSE_MARGIN_SECONDS",
    "LEASE_SECONDS",
    "LedgerBroken",
    "RunStatus",
    "UsageFile",
    "UsageMismatch",
    "UsageNotReady",
    "UsageRefused",
    "UsageService",
    "UsageSettings",
]

log = get_logger("meterd.usage")

CLOSE_MARGIN_SECONDS = 120
CATCH_UP_DAYS_MAX = 62
BREACHES_IN_DETAIL_MAX = 10


class UsageNotReady(Exception):
    """The day is not closed, is in the future, or its usage has not been built yet."""


class UsageRefused(Exception):
    """The day's usage was not published; the message says why."""


class LedgerBroken(UsageRefused, InvariantBroken):
    """The ledger fails an invariant of `meterd ledger check`: nothing is published, and the
    daemon stops (an `InvariantBroken`)."""


class UsageMismatch(Exception):
    """Rebuilding a published day gives other bytes than were published."""


@dataclass(frozen=True)
class UsageSettings:
    state_dir: Path
    business_timezone: str
    increment_seconds: int
    research_max_minutes: int

    @classmethod
    def of(cls, settings: Settings) -> UsageSettings:
        return cls(
            state_dir=settings.state_dir,
            business_timezone=settings.business_timezone,
            increment_seconds=settings.increment_seconds,
            research_max_minutes=settings.research_max_minutes,
        )


class UsageService:
    def __init__(
        self,
        database: Database,
        settings: UsageSettings,
        clock: Clock,
        *,
        instance: str | None = None,
    ) -> None:
        self._database = database
        self._settings = settings
        self._clock = clock
        self._lease = UsageLease(database, clock, instance)
        self.directory = settings.state_dir / "usage"
        self._builder = UsageBuilder(
            database,
            clock,
            self.directory,
            timezone=settings.business_timezone,
            increment_seconds=settings.increment_seconds,
            research_max_minutes=settings.research_max_minutes,
        )

    @classmethod
    def from_settings(cls, database: Database, settings: Settings, clock: Clock) -> UsageService:
        return cls(database, UsageSettings.of(settings), clock)

    @property
    def timezone(self) -> str:
        return self._settings.business_timezone

    def path(self, day: dt.date, kind: UsageFile) -> Path:
        return self.directory / kind.file_name(day)

    def last_closed_day(self) -> dt.date:
        return last_closed_day(self._clock(), self.timezone, CLOSE_MARGIN_SECONDS)

    def require_closed(self, day: dt.date) -> None:
        now = self._clock()
        today = business_day_of(now, self.timezone)
        if day > today:
            raise UsageNotReady(
                f"{day} is in the future (it is {today} in {self.timezone}); usage exists only "
                f"for business days that have closed"
            )
        if day > self.last_closed_day():
            _, end = day_bounds(day, self.timezone)
            raise UsageNotReady(
                f"the business day {day} ({self.timezone}) has not closed yet: it ends at "
                f"{iso_utc(end)}, and its usage is built after that, at usage_cron"
            )

    # --- the jobs -------------------------------------------------------------------------------

    async def catch_up(self) -> list[dt.date]:
        """Build every closed day that has no published usage yet (the nightly job, and the job
        at start). Returns the days this service built and published."""
        days = await self._missing_days(self.last_closed_day())
        if not days:
            return []
        await self._check_ledger_or_refuse(days)
        built: list[dt.date] = []
        for day in days:
            if not await self._lease.claim(day):
                log.info("usage being built elsewhere or already published", business_day=str(day))
                continue
            try:
                await self._build_and_publish(day)
            except UsageRefused:
                continue  # recorded and alerted; the next run tries again
            built.append(day)
        return built

    async def build(self, day: dt.date, *, regenerate: bool = False) -> None:
        """`meterd usage`: make sure the day's files are here and published; with `regenerate`,
        build them again from the ledger and prove them identical to what was published."""
        self.require_closed(day)
        run = await self._run(day)
        if run is not None and run.status == RunStatus.PUBLISHED:
            if regenerate:
                await self._rebuild_published(day, run)
            else:
                await self._ensure_files(day, run)
            return
        await self._check_ledger_or_refuse([day])
        if not await self._lease.claim(day):
            raise UsageNotReady(f"another meterd is building the usage of {day}; try again shortly")
        await self._build_and_publish(day)

    async def published_file(self, day: dt.date, kind: UsageFile) -> Path:
        """The published file of a day, here (rebuilt and proven identical if it is missing)."""
        self.require_closed(day)
        run = await self._run(day)
        if run is None or run.status in (RunStatus.BUILDING, RunStatus.FAILED):
            raise UsageNotReady(
                f"the usage of {day} has not been built yet: the nightly job builds it at "
                f"usage_cron (or now: meterd usage --date {day})"
            )
        if run.status == RunStatus.REFUSED:
            raise UsageRefused(f"the usage of {day} was refused: {run.detail}")
        await self._ensure_files(day, run, only=kind)
        return self.path(day, kind)

    # --- runs -----------------------------------------------------------------------------------

    async def _run(self, day: dt.date) -> Record | None:
        async with self._database.read() as connection:
            return await usage_store.run_of(connection, day)

    async def _missing_days(self, last: dt.date) -> list[dt.date]:
        async with self._database.read() as connection:
            earliest_run = await usage_store.earliest_run_day(connection)
            earliest_posting = await usage_store.earliest_posting_at(connection)
            anchors = [earliest_run] if earliest_run is not None else []
            if earliest_posting is not None:
                anchors.append(business_day_of(earliest_posting, self.timezone))
            first = min(anchors) if anchors else last
            window_start = last - dt.timedelta(days=CATCH_UP_DAYS_MAX - 1)
            if first < window_start:
                log.warning(
                    "usage older than the catch-up window is not built by itself; build it "
                    "with meterd usage --date",
                    from_day=str(first),
                    window_start=str(window_start),
                )
                first = window_start
            if first > last:
                return []
            published = await usage_store.published_days(connection, first, last)
        count = (last - first).days + 1
        days = (first + dt.timedelta(days=n) for n in range(count))
        return [day for day in days if day not in published]

    async def _check_ledger_or_refuse(self, days: Sequence[dt.date]) -> None:
        report = await check_ledger(self._database)
        if report.ok:
            return
        detail = "the ledger fails its invariants: " + _breaches(report)
        for day in days:
            if await self._lease.claim(day):
                await self._lease.finish(day, RunStatus.REFUSED, detail=detail)
        log.critical(
            "usage NOT published",
            business_days=[str(day) for day in days],
            reason=detail,
        )
        raise LedgerBroken(
            f"usage of {', '.join(str(day) for day in days)} not published: {detail}"
        )

    async def _build_and_publish(self, day: dt.date) -> None:
        """Build the claimed day, publish it, record it; refuse (recorded, alerted) if it does
        not reconcile."""
        lease = self._lease
        try:
            built = await self._builder.build(day, heartbeat=lambda: lease.renew(day))
        except UsageDoesNotReconcile as error:
            detail = f"the report does not reconcile: {error}"
            await lease.finish(day, RunStatus.REFUSED, detail=detail)
            log.critical("usage NOT published", business_day=str(day), reason=detail)
            raise UsageRefused(f"usage of {day} not published: {detail}") from error
        except BaseException as error:
            await asyncio.shield(lease.finish(day, RunStatus.FAILED, detail=repr(error)[:2000]))
            raise
        try:
            await asyncio.to_thread(built.commit)
        except BaseException:
            built.discard()
            await asyncio.shield(lease.finish(day, RunStatus.FAILED, detail="writing the files"))
            raise
        if await lease.finish(day, RunStatus.PUBLISHED, sha256=built.sha256):
            log.info(
                "usage published",
                business_day=str(day),
                accounts=built.accounts,
                call_rows=built.calls_rows,
                directory=str(self.directory),
            )

    async def _ensure_files(self, day: dt.date, run: Record, only: UsageFile | None = None) -> None:
        kinds = [only] if only is not None else list(UsageFile)
        for kind in kinds:
            digest = await asyncio.to_thread(sha256_of, self.path(day, kind))
            if digest != getattr(run, kind.sha_column):
                if digest is not None:
                    log.warning(
                        "a usage file differs from what was published; rebuilding it",
                        business_day=str(day),
                        file=kind.file_name(day),
                    )
                await self._rebuild_published(day, run)
                return

    async def _rebuild_published(self, day: dt.date, run: Record) -> None:
        """Build a published day again; its files must be the published bytes."""
        report = await check_ledger(self._database)
        if not report.ok:
            detail = "the ledger fails its invariants: " + _breaches(report)
            log.critical("usage cannot be rebuilt", business_day=str(day), reason=detail)
            raise LedgerBroken(f"usage of {day} cannot be rebuilt: {detail}")
        built = await self._rebuild(day, CALL_COLUMNS)
        differs = _differs(day, built, run)
        if differs:
            # a day published before the calls file had `direction` (0009) rebuilds in that
            # layout: its published bytes stay what finance fetched
            built.discard()
            built = await self._rebuild(day, CALL_COLUMNS_BEFORE_DIRECTION)
            if _differs(day, built, run):
                built.discard()
            else:
                differs = []
        if differs:
            log.critical(
                "usage rebuilds differently from what was published",
                business_day=str(day),
                files=differs,
            )
            raise UsageMismatch(
                f"the usage of {day} rebuilds differently from what was published "
                f"({', '.join(differs)}): the data it came from changed after it was published"
            )
        try:
            await asyncio.to_thread(built.commit)
        except BaseException:
            built.discard()
            raise

    async def _rebuild(self, day: dt.date, call_columns: Columns) -> BuiltFiles:
        try:
            return await self._builder.build(day, heartbeat=None, call_columns=call_columns)
        except UsageDoesNotReconcile as error:
            log.critical("usage cannot be rebuilt", business_day=str(day), reason=str(error))
            raise UsageRefused(f"usage of {day} cannot be rebuilt: {error}") from error


def _differs(day: dt.date, built: BuiltFiles, run: Record) -> list[str]:
    """The names of the built files whose SHA-256 is not what was published."""
    return [
        kind.file_name(day)
        for kind, digest in built.sha256.items()
        if digest != getattr(run, kind.sha_column)
    ]


def _breaches(report: CheckReport) -> str:
    shown = "; ".join(
        f"[{breach.invariant}] {breach.detail}"
        for breach in report.breaches[:BREACHES_IN_DETAIL_MAX]
    )
    more = len(report.breaches) - BREACHES_IN_DETAIL_MAX
    return shown + (f"; and {more} more (meterd ledger check lists them)" if more > 0 else "")
