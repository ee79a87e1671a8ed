"""Timed jobs, on APScheduler 3's AsyncIOScheduler inside the daemon's loop.

Every job is idempotent in the database, so a job that runs twice (two daemons, a restart) does
no harm. Defaults are explicit: APScheduler's own 1-second misfire grace would silently drop runs
after a short stall. A job that fails is logged and runs again next time; a job that finds a
broken money invariant stops the daemon.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from meterd.core.ledger import LedgerError
from meterd.logs import get_logger
from meterd.services.errors import InvariantBroken

log = get_logger("meterd.scheduler")

JOB_DEFAULTS = {"misfire_grace_time": 300, "coalesce": True, "max_instances": 1}
STALE_SWEEP_INTERVAL_SECONDS = 600


class Scheduler:
    def __init__(self, on_invariant_broken: Callable[[InvariantBroken], None]) -> None:
        self.apscheduler = AsyncIOScheduler(timezone=dt.UTC, job_defaults=dict(JOB_DEFAULTS))
        self._on_invariant_broken = on_invariant_broken
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def every(self, seconds: int, job_id: str, work: Callable[[], Awaitable[object]]) -> None:
        """Run `work` every `seconds`; never two at once; a missed run is run once, late."""

        async def run() -> None:
            self._running += 1
            self._idle.clear()
            try:
                await work()
            except (InvariantBroken, LedgerError) as error:
                log.critical("money invariant broken", job=job_id, error=str(error), exc_info=True)
                self._on_invariant_broken(InvariantBroken(str(error)))
            except Exception:
                log.exception("scheduled job failed", job=job_id)
            finally:
                self._running -= 1
                if self._running == 0:
                    self._idle.set()

        self.apscheduler.add_job(
            run,
            IntervalTrigger(seconds=seconds),
            id=job_id,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(seconds, 30),
        )

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


def create_scheduler(on_invariant_broken: Callable[[InvariantBroken], None]) -> Scheduler:
    return Scheduler(on_invariant_broken)
