"""The nightly check against Twilio's own call records (docs/operations.md, Reconciliation):
after the nightly usage, meterd lists the business day's calls from Twilio's REST API (the
Calls resource, page after page) and compares them with its own (`core/reconciliation.py`).
The report is kept per day and served to finance (`/finance/reconciliation/{day}.json|.csv`);
`meterd reconcile --date` runs it by hand. A call Twilio has and meterd never recorded is an
alert (`call.missing_in_meterd`, docs/alerts.md) and an error in the log. With no Twilio account
configured, the job says that it is off and does nothing."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any, Protocol, runtime_checkable

from meterd.clock import Clock
from meterd.core.reconciliation import MeterdCall, Reconciliation, TwilioCall, reconcile
from meterd.core.usage import day_bounds
from meterd.logs import get_logger
from meterd.services.alerts import AlertKind, AlertService
from meterd.services.usage import UsageService
from meterd.store import reconciliation_store
from meterd.store.database import Database

log = get_logger("meterd.reconciliation")

MARGIN = dt.timedelta(minutes=10)  # around the day, for calls at midnight
CATCH_UP_DAYS = 7
CSV_COLUMNS = (
    "business_day",
    "finding",
    "call_sid",
    "started_at",
    "twilio_seconds",
    "meterd_seconds",
    "status",
)


class ReconciliationOff(Exception):
    """No Twilio account is configured: there is nothing to compare with."""


class ReconciliationNotReady(Exception):
    """The day has not been reconciled yet."""


@runtime_checkable
class CallLister(Protocol):
    async def list_calls(self, first_day: dt.date, last_day: dt.date) -> list[TwilioCall]: ...


class ReconciliationService:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        twilio: CallLister | None,
        usage: UsageService,
        alerts: AlertService,
        *,
        tolerance_seconds: int,
    ) -> None:
        self._database = database
        self._clock = clock
        self._twilio = twilio
        self._usage = usage
        self._alerts = alerts
        self._tolerance_seconds = tolerance_seconds

    @property
    def enabled(self) -> bool:
        return self._twilio is not None

    async def nightly(self) -> list[dt.date]:
        """The nightly job: each of the last `CATCH_UP_DAYS` closed days not reconciled yet (a
        night Twilio did not answer, or meterd was down, is caught up the next)."""
        if self._twilio is None:
            log.info("reconciliation with Twilio is off: no Twilio account is configured")
            return []
        last = self._usage.last_closed_day()
        done = []
        for back in range(CATCH_UP_DAYS - 1, -1, -1):
            day = last - dt.timedelta(days=back)
            async with self._database.read() as connection:
                if await reconciliation_store.load(connection, day) is not None:
                    continue
            await self.run(day)
            done.append(day)
        return done

    async def run(self, day: dt.date) -> dict[str, Any]:
        """Reconcile a closed business day, keep the report and return it."""
        if self._twilio is None:
            raise ReconciliationOff("no Twilio account is configured (twilio_account_sid)")
        self._usage.require_closed(day)
        start, end = day_bounds(day, self._usage.timezone)
        # Both sides are read with a margin around the day (clocks a few seconds apart at
        # midnight); Twilio filters by UTC date, and whether `StartTime<` keeps its date is not
        # worth betting on: ask for one date more, `reconcile` keeps the day
        first_date = (start - MARGIN).astimezone(dt.UTC).date()
        last_date = (end + MARGIN).astimezone(dt.UTC).date() + dt.timedelta(days=1)
        listed = await self._twilio.list_calls(first_date, last_date)
        async with self._database.read() as connection:
            rows = await reconciliation_store.calls_started(
                connection, start - MARGIN, end + MARGIN
            )
            inbound = sorted({c.sid for c in listed if c.direction == "inbound"})
            agents = await reconciliation_store.participants_among(connection, inbound)
        ours = [MeterdCall(r.call_sid, r.started_at, r.ended_at, r.status) for r in rows]
        found = reconcile(
            listed,
            ours,
            participant_sids=agents,
            start=start,
            end=end,
            tolerance_seconds=self._tolerance_seconds,
        )
        in_day = sum(1 for c in ours if start <= c.started_at < end)
        report = self._report(day, start, end, found, len(listed), in_day)
        now = self._clock()
        async with self._database.write() as connection:
            await reconciliation_store.save(connection, day, json.dumps(report), now)
            for call in found.missing_in_meterd:
                data = {"call_sid": call.sid, "business_day": day.isoformat()}
                await self._alerts.record(
                    connection, AlertKind.CALL_MISSING_IN_METERD, "", call.sid, data, now
                )
        if found.missing_in_meterd:
            log.error(
                "calls Twilio has that meterd never recorded",
                business_day=day.isoformat(),
                call_sids=[c.sid for c in found.missing_in_meterd][:50],
            )
        log.info(
            "reconciled with Twilio",
            business_day=day.isoformat(),
            matched=found.matched,
            missing_in_meterd=len(found.missing_in_meterd),
            missing_at_twilio=len(found.missing_at_twilio),
            duration_differs=len(found.duration_differs),
        )
        return report

    async def report(self, day: dt.date) -> dict[str, Any]:
        """The kept report of a day."""
        if self._twilio is None:
            raise ReconciliationOff("no Twilio account is configured: reconciliation is off")
        async with self._database.read() as connection:
            kept = await reconciliation_store.load(connection, day)
        if kept is None:
            raise ReconciliationNotReady(
                f"{day} has not been reconciled yet: the nightly job does it after the usage "
                f"(or now: meterd reconcile --date {day})"
            )
        report: dict[str, Any] = json.loads(kept)
        return report

    def _report(
        self,
        day: dt.date,
        start: dt.datetime,
        end: dt.datetime,
        found: Reconciliation,
        twilio_calls: int,
        meterd_calls: int,
    ) -> dict[str, Any]:
        def at(moment: dt.datetime | None) -> str | None:
            return None if moment is None else moment.astimezone(dt.UTC).isoformat()

        return {
            "business_day": day.isoformat(),
            "timezone": self._usage.timezone,
            "from": at(start),
            "to": at(end),
            "tolerance_seconds": self._tolerance_seconds,
            "twilio_calls_listed": twilio_calls,
            "meterd_calls": meterd_calls,
            "matched": found.matched,
            "clean": found.clean,
            "missing_in_meterd": [
                {"call_sid": c.sid, "started_at": at(c.start_time),
                 "twilio_seconds": c.duration_seconds, "status": c.status}
                for c in found.missing_in_meterd
            ],
            "missing_at_twilio": [
                {"call_sid": c.sid, "started_at": at(c.started_at),
                 "meterd_seconds": c.duration_seconds, "status": c.status}
                for c in found.missing_at_twilio
            ],
            "duration_differs": [
                {"call_sid": d.sid, "twilio_seconds": d.twilio_seconds,
                 "meterd_seconds": d.meterd_seconds}
                for d in found.duration_differs
            ],
        }  # fmt: skip


def report_csv(report: dict[str, Any]) -> str:
    """One line per finding, RFC 4180 (CRLF), a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for finding in ("missing_in_meterd", "missing_at_twilio", "duration_differs"):
        for item in report[finding]:
            writer.writerow(
                [
                    report["business_day"],
                    finding,
                    item["call_sid"],
                    item.get("started_at") or "",
                    "" if item.get("twilio_seconds") is None else item["twilio_seconds"],
                    "" if item.get("meterd_seconds") is None else item["meterd_seconds"],
                    item.get("status", ""),
                ]
            )
    return out.getvalue()
