"""Timed jobs, on APScheduler 3's AsyncIOScheduler inside the daemon's loop.

Every job is idempotent in the database, so a job that runs twice (two daemons, a restart) does
no harm. Defaults are explicit: APScheduler's own 1-second misfire grace would silently drop runs
after a short stall.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from meterd.logs import get_logger

log = get_logger("meterd.scheduler")

JOB_DEFAULTS = {"misfire_grace_time": 300, "coalesce": True, "max_instances": 1}
STALE_SWEEP_INTERVAL_SECONDS = 600


def create_scheduler() -> AsyncIOScheduler:
    return AsyncIOScheduler(timezone=dt.UTC, job_defaults=dict(JOB_DEFAULTS))


def add_interval_job(
    scheduler: AsyncIOScheduler, job_id: str, work: Callable[[], Awaitable[object]], seconds: int
) -> None:
    async def run() -> None:
        try:
            await work()
        except Exception:
            log.exception("scheduled job failed", job=job_id)

    scheduler.add_job(
        run,
        IntervalTrigger(seconds=seconds),
        id=job_id,
        replace_existing=True,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=seconds,
    )
