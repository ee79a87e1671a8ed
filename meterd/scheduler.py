"""Timed jobs, on APScheduler 3's AsyncIOScheduler inside the daemon's loop.

Every job is idempotent in the database, so a job that runs twice (two daemons, a restart) does
no harm. Defaults are explicit: APScheduler's own 1-second misfire grace would silently drop runs
after a short stall. A job that fails is logged and runs again next time (while the database is
unavailable, as one rate-limited line without a traceback: `meterd/store/outage.py`); a job that
finds a broken money invariant stops the daemon. A run skipped because the previous one has not
finished is one info line (`logs.py` turns APScheduler's warning into it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from meterd.core.ledger import LedgerError
from meterd.crontab import trigger as crontab_trigger
from meterd.logs import get_logger
from meterd.metrics import Metrics
from meterd.services.errors import InvariantBroken
from meterd.store.outage import OutageLog, is_unavailable

log = get_logger("meterd.scheduler")

JOB_DEFAULTS = {"misfire_grace_time": 300, "coalesce": True, "max_instances": 1}
STALE_SWEEP_INTERVAL_SECONDS = 600
ALERT_WATCH_SECONDS = 5  # how often balances are looked at against their alert thresholds
# A nightly run delayed by up to an hour (a stall, a busy loop) still runs; later than that, the
# next run or the next start catches the day up.
CRON_MISFIRE_GRACE_SECONDS = 3600
# Jobs run `on_the_second` start this long after it: past the second, not a hair before it.
WHOLE_SECOND_OFFSET = dt.timedelta(milliseconds=20)


class Scheduler:
    def __init__(
        self,
        on_invariant_broken: Callable[[InvariantBroken], None],
        metrics: Metrics | None = None,
        outage: OutageLog | None = None,
    ) -> None:
        self.apscheduler = AsyncIOScheduler(timezone=dt.UTC, job_defaults=dict(JOB_DEFAULTS))
        self._on_invariant_broken = on_invariant_broken
        self._metrics = metrics  # job runs, failures, durations; the health check reads them
        self._outage = outage or OutageLog()  # the database's, so its recovery line is shared
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def every(
        self,
        seconds: int,
        job_id: str,
        work: Callable[[], Awaitable[object]],
        *,
        on_the_second: bool = False,
    ) -> None:
        """Run `work` every `seconds`; never two at once; a missed run is run once, late.
        `on_the_second`: runs start just after a whole second of the wall clock, the moment
        minutes fall due (call times are whole seconds), not at whatever fraction of a second
        the daemon happened to start."""
        start = None
        if on_the_second:
            now = dt.datetime.now(dt.UTC)
            start = now.replace(microsecond=0) + dt.timedelta(seconds=1) + WHOLE_SECOND_OFFSET
        self.apscheduler.add_job(
            self._guarded(job_id, work),
            IntervalTrigger(seconds=seconds, start_date=start),
            id=job_id,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(seconds, 30),
        )

    def cron(
        self,
        crontab: str,
        timezone: str,
        job_id: str,
        work: Callable[[], Awaitable[object]],
        *,
        misfire_grace_seconds: int = CRON_MISFIRE_GRACE_SECONDS,
    ) -> None:
        """Run `work` at the crontab's times in `timezone` (read as cron reads it, 0 = Sunday:
        `meterd.crontab`); never two at once; runs missed by
        a stall or a busy loop are run once, if no later than `misfire_grace_seconds`."""
        self.apscheduler.add_job(
            self._guarded(job_id, work),
            crontab_trigger(crontab, ZoneInfo(timezone)),
            id=job_id,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=misfire_grace_seconds,
        )

    def once(self, job_id: str, work: Callable[[], Awaitable[object]]) -> None:
        """Run `work` once, as soon as the scheduler runs (however late that is)."""
        self.apscheduler.add_job(
            self._guarded(job_id, work),
            id=job_id,
            replace_existing=True,
            max_instances=1,
            misfire_grace_time=None,
        )

    def _guarded(
        self, job_id: str, work: Callable[[], Awaitable[object]]
    ) -> Callable[[], Awaitable[None]]:
        """`work` counted, logged if it fails, stopping the daemon on a broken invariant."""

        async def run() -> None:
            self._running += 1
            self._idle.clear()
            if self._metrics is not None:
                self._metrics.job_started(job_id)
            failed = True
            try:
                await work()
                failed = False
            except (InvariantBroken, LedgerError) as error:
                log.critical("money invariant broken", job=job_id, error=str(error), exc_info=True)
                self._on_invariant_broken(InvariantBroken(str(error)))
            except Exception as error:
                if is_unavailable(error):
                    self._outage.failure(f"job:{job_id}", error)
                else:
                    log.exception("scheduled job failed", job=job_id)
            finally:
                if self._metrics is not None:
                    self._metrics.job_finished(job_id, failed=failed)
                self._running -= 1
                if self._running == 0:
                    self._idle.set()

        return run

    def start(self) -> None:
        self.apscheduler.start()

    def pause(self) -> None:
        self.apscheduler.pause()

    async def drain(self, timeout_seconds: float) -> bool:
        """Wait for running jobs to finish (after `pause`); False if they did not in time.
        APScheduler 3 would cancel them on shutdown, cutting a tick in half."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        self.apscheduler.shutdown(wait=False)


def create_scheduler(
    on_invariant_broken: Callable[[InvariantBroken], None],
    metrics: Metrics | None = None,
    outage: OutageLog | None = None,
) -> Scheduler:
    return Scheduler(on_invariant_broken, metrics, outage)
