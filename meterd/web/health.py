"""The health check: one (`Health.check`) serves `/healthz` (meterd/web/ops.py), the systemd
watchdog and the gauges refreshed on each scrape. It passes when
- the database answers within a timeout: one short transaction on the connection meterd writes
  with, counting the open calls (on SQLite that takes the write lock for an instant, because a
  database meterd cannot write to cannot record a webhook);
- and, when the app runs under a scheduler (the daemon; in-process tests have none), the scheduler
  is running (not paused by a stop) and a metering tick finished in the last
  `tick_stuck_seconds`.
A database that does not answer is asked once at a time: a later check waits for the same
question rather than piling up another one.

`/healthz` and `/metrics` are open, so what they say is short: `/healthz` says the database is
`unavailable` (or gave no answer in time), never the driver's text, which names hosts, databases
and users; the log has the error's class and text, once per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from apscheduler.schedulers.base import STATE_PAUSED, STATE_RUNNING

from meterd.logs import get_logger
from meterd.metrics import Metrics
from meterd.store.calls_store import CallStatus
from meterd.store.database import Database
from meterd.store.health_store import count_calls_by_status
from meterd.store.outage import describe, is_unavailable

if TYPE_CHECKING:
    from meterd.scheduler import Scheduler
    from meterd.services.intake import WebhookIntake

log = get_logger("meterd.health")
DATABASE_PING_TIMEOUT_SECONDS = 2.0
TICK_JOB = "metering-tick"
# Longer than any backlog tick should take (one tick posts for at most tick_batch_max calls):
# past it, a tick is hung (the database itself is probed separately, every check).
TICK_STUCK_SECONDS = 300.0
OPEN_STATUSES = (CallStatus.MENU, CallStatus.CONNECTED)


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    reason: str  # why not ok, short and safe to show anyone; "" when ok
    database: str  # "ok", "unavailable", "no answer" (in time) or "failing" (any other error)
    open_calls: dict[str, int] | None  # by status; None if the database did not answer
    tick_lag_seconds: float | None  # of the last metering tick, if any ran
    journal_entries: int = 0  # callbacks in the webhook journal, not yet in the database
    degraded: str = ""  # why meterd works but not fully (ok stays True); "" when not

    @property
    def status(self) -> str:
        if not self.ok:
            return "unhealthy"
        return "degraded" if self.degraded else "ok"

    @property
    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        if not self.ok:
            return self.reason
        if self.degraded:
            return f"degraded: {self.degraded}"
        parts = []
        if self.open_calls is not None:
            total = sum(self.open_calls.values())
            connected = self.open_calls.get(CallStatus.CONNECTED, 0)
            parts.append(f"{total} open calls ({connected} connected)")
        if self.tick_lag_seconds is not None:
            parts.append(f"tick lag {self.tick_lag_seconds:.1f} s")
        return "ok: " + ", ".join(parts) if parts else "ok"


class Health:
    def __init__(
        self,
        database: Database,
        metrics: Metrics,
        *,
        intake: WebhookIntake | None = None,
        tick_stuck_seconds: float = TICK_STUCK_SECONDS,
    ) -> None:
        self._database = database
        self._intake = intake
        self._metrics = metrics
        self.tick_stuck_seconds = tick_stuck_seconds
        self._scheduler: Scheduler | None = None
        self._scheduler_attached_monotonic = 0.0
        self._probe: asyncio.Task[dict[str, int]] | None = None
        self._status_before = "ok"

    def attach_scheduler(self, scheduler: Scheduler) -> None:
        """From now on the scheduler must run and the metering tick must not be stuck."""
        self._scheduler = scheduler
        self._scheduler_attached_monotonic = time.monotonic()

    async def check(self, timeout_seconds: float = DATABASE_PING_TIMEOUT_SECONDS) -> HealthReport:
        timeout_seconds = min(timeout_seconds, DATABASE_PING_TIMEOUT_SECONDS)
        reasons: list[str] = []
        open_calls: dict[str, int] | None = None
        database = "ok"
        problem: dict[str, str] = {}  # the error's class and text: for the log only
        try:
            open_calls = await self._open_calls(timeout_seconds)
        except TimeoutError:
            database = "no answer"
            reasons.append(f"database: no answer within {timeout_seconds:.1f} s")
        except Exception as error:  # any failure to answer is a reason to be unhealthy
            database = "unavailable" if is_unavailable(error) else "failing"
            reasons.append(f"database: {database}")
            problem = describe(error)
        degraded = ""
        journal_entries = self._intake.journal_entries if self._intake is not None else 0
        if self._intake is not None and self._intake.can_journal:
            # Callbacks are journaled while the database is away: meterd is doing its job, and
            # a restart (the watchdog's) would not bring the database back.
            if database != "ok":
                degraded = f"journaling: database {database}"
                reasons = [reason for reason in reasons if not reason.startswith("database")]
            elif journal_entries:
                degraded = "journaling: applying the journal to the database"
        reasons.extend(self._scheduler_problems() if not degraded else [])
        report = HealthReport(
            ok=not reasons,
            reason="; ".join(reasons),
            database=database,
            open_calls=open_calls,
            tick_lag_seconds=self._metrics.last_tick_lag_seconds,
            journal_entries=journal_entries,
            degraded=degraded,
        )
        self._metrics.healthy.set(1 if report.ok else 0)
        if open_calls is not None:
            for status in OPEN_STATUSES:
                self._metrics.open_calls.labels(status).set(open_calls.get(status, 0))
        if report.status != self._status_before:  # log changes, not every probe
            if report.status == "ok":
                log.info("healthy again")
            elif report.status == "degraded":
                log.warning("health check: degraded", reason=report.degraded, **problem)
            else:
                log.warning("health check failed", reason=report.reason, **problem)
            self._status_before = report.status
        return report

    def _scheduler_problems(self) -> list[str]:
        if self._scheduler is None:
            return []
        state = self._scheduler.apscheduler.state
        if state == STATE_PAUSED:
            return ["scheduler: paused (meterd is stopping)"]
        if state != STATE_RUNNING:
            return ["scheduler: not running"]
        quiet_seconds = self._metrics.seconds_since_finished(
            TICK_JOB, since_monotonic=self._scheduler_attached_monotonic
        )
        if quiet_seconds > self.tick_stuck_seconds:
            return [f"metering tick stuck: none finished in the last {quiet_seconds:.0f} s"]
        return []

    async def _open_calls(self, timeout_seconds: float) -> dict[str, int]:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._count_open_calls())
            self._probe.add_done_callback(_retrieve_exception)
        # shield: a slow database keeps the one probe in flight for the next check to wait on
        return await asyncio.wait_for(asyncio.shield(self._probe), timeout_seconds)

    async def _count_open_calls(self) -> dict[str, int]:
        async with self._database.write() as connection:
            return await count_calls_by_status(connection, OPEN_STATUSES)

    async def close(self, _app: web.Application | None = None) -> None:
        """Cancel a probe still waiting for the database (before the database is closed)."""
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe


def _retrieve_exception(task: asyncio.Task[dict[str, int]]) -> None:
    if not task.cancelled():
        task.exception()  # read, so a probe nobody waited for is not reported as lost
