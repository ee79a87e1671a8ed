"""Prometheus metrics, in meterd's own registry (never prometheus-client's global one).

`Metrics` is built by `create_app` (or handed to it by the daemon, which also gives it to the
scheduler), so nothing is registered at import time and each app in a test has its own counters.
Counters count what this process did; add them up across daemons behind a load balancer.

Who feeds what:
- webhooks by route and status, signature failures: `metrics_middleware`, on `/twilio/*`;
- postings by kind, tick lag, calls settled: the metering tick's report (`observe_tick`);
  other services may call `posted(kind)`;
- payment outcomes: the payments code, `payment(outcome)`;
- scheduler job runs, failures, durations, running jobs: the scheduler's run wrapper
  (`job_started` / `job_finished`);
- open calls and `meterd_healthy`: the health check (`meterd.web.ops.Health`), run on every scrape.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from meterd.services.metering import TickReport

WEBHOOK_PREFIX = "/twilio/"
# The 403 codes meterd.web.twilio_request gives a webhook whose signature cannot be trusted.
SIGNATURE_FAILURE_CODES = frozenset(
    {
        "missing_signature",
        "bad_signature",
        "auth_token_not_set",
        "webhook_key_not_set",
        "signature_scheme_unsupported",
    }
)
TICK_LAG_BUCKETS_SECONDS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
JOB_DURATION_BUCKETS_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.webhooks = Counter(
            "meterd_webhooks",
            "Twilio webhook requests answered, by route and HTTP status",
            ["route", "status"],
            registry=registry,
        )
        self.signature_failures = Counter(
            "meterd_webhook_signature_failures",
            "Twilio webhooks refused (403, nothing stored) for a missing or wrong signature",
            ["route", "reason"],
            registry=registry,
        )
        self.postings = Counter(
            "meterd_postings",
            "ledger transactions posted by this process, by kind (minute: live metering)",
            ["kind"],
            registry=registry,
        )
        self.calls_settled = Counter(
            "meterd_calls_settled", "calls settled by the metering tick", registry=registry
        )
        self.metering_failures = Counter(
            "meterd_metering_call_failures",
            "calls the metering tick could not meter (tried again next tick; the error log says "
            "why)",
            registry=registry,
        )
        self.tick_lag = Histogram(
            "meterd_tick_lag_seconds",
            "how overdue the most overdue minute was when a metering tick began",
            buckets=TICK_LAG_BUCKETS_SECONDS,
            registry=registry,
        )
        self.open_calls = Gauge(
            "meterd_open_calls",
            "calls not ended, by status (menu: answered, not yet connected; connected: metered)",
            ["status"],
            registry=registry,
        )
        self.reconciliation_findings = Gauge(
            "meterd_reconciliation_findings",
            "the last reconciliation with Twilio's call records, by finding "
            "(missing_in_meterd, missing_at_twilio, duration_differs)",
            ["finding"],
            registry=registry,
        )
        self.payments = Counter(
            "meterd_payments", "card payment outcomes, by outcome", ["outcome"], registry=registry
        )
        self.job_runs = Counter(
            "meterd_scheduler_job_runs",
            "scheduled job runs finished, failed ones included, by job",
            ["job"],
            registry=registry,
        )
        self.job_failures = Counter(
            "meterd_scheduler_job_failures",
            "scheduled job runs that raised, by job",
            ["job"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "meterd_scheduler_job_duration_seconds",
            "how long scheduled job runs took, by job",
            ["job"],
            buckets=JOB_DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.jobs_running = Gauge(
            "meterd_scheduler_jobs_running",
            "scheduled jobs running now, by job",
            ["job"],
            registry=registry,
        )
        self.job_last_finished = Gauge(
            "meterd_scheduler_job_last_finished_timestamp_seconds",
            "when a run of the job last finished (Unix time), by job",
            ["job"],
            registry=registry,
        )
        self.healthy = Gauge(
            "meterd_healthy",
            "1 if the last health check passed (database, scheduler, tick), else 0",
            registry=registry,
        )
        self.created_monotonic = time.monotonic()
        self.last_tick_lag_seconds: float | None = None
        self._job_started: dict[str, float] = {}
        self._job_finished: dict[str, float] = {}

    # webhooks
    def webhook(self, route: str, status: int | str) -> None:
        self.webhooks.labels(route, str(status)).inc()

    def signature_failure(self, route: str, reason: str) -> None:
        self.signature_failures.labels(route, reason).inc()

    # money
    def posted(self, kind: str, count: int = 1) -> None:
        if count > 0:
            self.postings.labels(kind).inc(count)

    def payment(self, outcome: str) -> None:
        """One card payment operation ended with `outcome` (a short fixed word, e.g.
        succeeded, declined, failed)."""
        self.payments.labels(outcome).inc()

    def observe_tick(self, report: TickReport) -> None:
        self.tick_lag.observe(report.lag_seconds)
        self.last_tick_lag_seconds = report.lag_seconds
        self.posted("minute", report.minutes_posted)
        if report.calls_settled:
            self.calls_settled.inc(report.calls_settled)
        if report.errors:
            self.metering_failures.inc(len(report.errors))

    def observe_reconciliation(self, report: dict[str, Any]) -> None:
        for finding in ("missing_in_meterd", "missing_at_twilio", "duration_differs"):
            self.reconciliation_findings.labels(finding).set(len(report[finding]))

    # the scheduler
    def job_started(self, job: str) -> None:
        self._job_started[job] = time.monotonic()
        self.jobs_running.labels(job).inc()
        self.job_runs.labels(job)  # every job shows up, at 0, from its first start
        self.job_failures.labels(job)

    def job_finished(self, job: str, *, failed: bool) -> None:
        now = time.monotonic()
        started = self._job_started.pop(job, now)
        self._job_finished[job] = now
        self.jobs_running.labels(job).dec()
        self.job_runs.labels(job).inc()
        if failed:
            self.job_failures.labels(job).inc()
        self.job_duration.labels(job).observe(now - started)
        self.job_last_finished.labels(job).set(time.time())

    def seconds_since_finished(self, job: str, *, since_monotonic: float) -> float:
        """Seconds since a run of `job` last finished, or since `since_monotonic` if none has
        finished after it."""
        finished = max(self._job_finished.get(job, since_monotonic), since_monotonic)
        return time.monotonic() - finished


METRICS = web.AppKey("metrics", Metrics)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every Twilio webhook by route and final status, and signature failures by reason.
    Outermost, so it sees the status the error middleware chose."""
    if not request.path.startswith(WEBHOOK_PREFIX):
        return await handler(request)
    metrics = request.app[METRICS]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status: int | str = "cancelled"
    try:
        response = await handler(request)
        status = response.status
        if status == 403:
            reason = _error_code(response)
            if reason in SIGNATURE_FAILURE_CODES:
                metrics.signature_failure(route, reason)
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        metrics.webhook(route, status)


def _error_code(response: web.StreamResponse) -> str:
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        return ""
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    code = payload.get("error") if isinstance(payload, dict) else None
    return code if isinstance(code, str) else ""
