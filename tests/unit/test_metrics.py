"""Metrics in their own registry, the webhook middleware, and the health check (with a fake
database, so it runs without one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import prometheus_client
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from meterd.metrics import METRICS, Metrics, metrics_middleware
from meterd.scheduler import Scheduler
from meterd.services.metering import TickReport
from meterd.web.health import TICK_JOB, Health


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_metrics_object_has_its_own_registry_and_nothing_is_global():
    first, second = Metrics(), Metrics()
    first.payment("succeeded")
    assert sample(first, "meterd_payments_total", outcome="succeeded") == 1
    assert sample(second, "meterd_payments_total", outcome="succeeded") is None
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("meterd_") for name in global_names)


def test_a_tick_report_feeds_postings_lag_and_settlements():
    metrics = Metrics()
    metrics.observe_tick(TickReport(minutes_posted=3, calls_settled=1, lag_seconds=1.5))
    metrics.observe_tick(TickReport())
    assert sample(metrics, "meterd_postings_total", kind="minute") == 3
    assert sample(metrics, "meterd_calls_settled_total") == 1
    assert sample(metrics, "meterd_tick_lag_seconds_count") == 2
    assert sample(metrics, "meterd_tick_lag_seconds_sum") == 1.5
    assert metrics.last_tick_lag_seconds == 0.0


def test_calls_the_tick_could_not_meter_are_counted():
    metrics = Metrics()
    metrics.observe_tick(TickReport(errors=["CA1: a damaged event", "CA2: another"]))
    metrics.observe_tick(TickReport(errors=["CA1: a damaged event"]))
    assert sample(metrics, "meterd_metering_call_failures_total") == 3


def test_job_runs_failures_and_running_jobs_are_counted_by_job():
    metrics = Metrics()
    metrics.job_started("metering-tick")
    assert sample(metrics, "meterd_scheduler_jobs_running", job="metering-tick") == 1
    assert sample(metrics, "meterd_scheduler_job_runs_total", job="metering-tick") == 0
    metrics.job_finished("metering-tick", failed=False)
    metrics.job_started("metering-tick")
    metrics.job_finished("metering-tick", failed=True)
    assert sample(metrics, "meterd_scheduler_jobs_running", job="metering-tick") == 0
    assert sample(metrics, "meterd_scheduler_job_runs_total", job="metering-tick") == 2
    assert sample(metrics, "meterd_scheduler_job_failures_total", job="metering-tick") == 1
    assert sample(metrics, "meterd_scheduler_job_duration_seconds_count", job="metering-tick") == 2


async def test_the_scheduler_wrapper_feeds_job_metrics():
    metrics = Metrics()
    scheduler = Scheduler(lambda error: None, metrics)
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()
        raise RuntimeError("this run fails")

    scheduler.every(1, "flaky", work)
    job = scheduler.apscheduler.get_job("flaky")
    scheduler.start()
    try:
        await job.func()
        assert ran.is_set()
    finally:
        scheduler.shutdown()
    assert sample(metrics, "meterd_scheduler_job_runs_total", job="flaky") == 1
    assert sample(metrics, "meterd_scheduler_job_failures_total", job="flaky") == 1


@pytest.fixture
async def webhook_client(aiohttp_client):
    async def voice(request: web.Request) -> web.Response:
        return web.Response(text="<Response/>", content_type="application/xml")

    async def refused(request: web.Request) -> web.Response:
        return web.json_response({"error": "bad_signature", "detail": "no"}, status=403)

    async def too_large(request: web.Request) -> web.Response:
        raise web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2)

    async def admin(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application(middlewares=[metrics_middleware])
    app[METRICS] = Metrics()
    app.router.add_post("/twilio/voice", voice)
    app.router.add_post("/twilio/conference", refused)
    app.router.add_post("/twilio/call-status", too_large)
    app.router.add_get("/admin/accounts", admin)
    client = await aiohttp_client(app)
    return client, app[METRICS]


async def test_webhooks_are_counted_by_route_and_status(webhook_client):
    client, metrics = webhook_client
    for _ in range(2):
        assert (await client.post("/twilio/voice", data={"a": "b"})).status == 200
    assert (await client.post("/twilio/conference", data={})).status == 403
    assert (await client.post("/twilio/call-status", data={})).status == 413
    assert (await client.post("/twilio/no-such-hook", data={})).status == 404
    assert (await client.get("/admin/accounts")).status == 200
    assert sample(metrics, "meterd_webhooks_total", route="/twilio/voice", status="200") == 2
    assert sample(metrics, "meterd_webhooks_total", route="/twilio/conference", status="403") == 1
    assert sample(metrics, "meterd_webhooks_total", route="/twilio/call-status", status="413") == 1
    assert sample(metrics, "meterd_webhooks_total", route="unmatched", status="404") == 1
    assert (
        sample(
            metrics,
            "meterd_webhook_signature_failures_total",
            route="/twilio/conference",
            reason="bad_signature",
        )
        == 1
    )
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            prometheus_client.generate_latest(metrics.registry).decode()
        )
    }
    assert families["meterd_webhooks"].type == "counter"
    assert all(s.labels["route"] != "/admin/accounts" for s in families["meterd_webhooks"].samples)


class FakeDatabase:
    """Answers the open-calls query, fails, or hangs until released."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int]] = [("connected", 2), ("menu", 1)]
        self.mode = "ok"
        self.release = asyncio.Event()
        self.queries = 0

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        self.queries += 1
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "fail":
            raise OSError("disk I/O error")
        yield self

    async def execute(self, statement: Any) -> list[tuple[str, int]]:
        return self.rows


async def test_healthy_reports_open_calls_and_sets_the_gauges():
    metrics = Metrics()
    health = Health(FakeDatabase(), metrics)  # type: ignore[arg-type]
    report = await health.check()
    assert report.ok and report.reason == ""
    assert report.summary == "ok: 3 open calls (2 connected)"
    assert sample(metrics, "meterd_healthy") == 1
    assert sample(metrics, "meterd_open_calls", status="connected") == 2
    assert sample(metrics, "meterd_open_calls", status="menu") == 1


async def test_a_database_that_fails_or_hangs_is_unhealthy_and_asked_once_at_a_time():
    metrics = Metrics()
    database = FakeDatabase()
    health = Health(database, metrics)  # type: ignore[arg-type]
    database.mode = "fail"
    report = await health.check()
    # the driver's text is for the log, never for the open endpoint
    assert not report.ok and report.reason == "database: failing"
    assert sample(metrics, "meterd_healthy") == 0

    database.mode = "hang"
    queries = database.queries
    for _ in range(3):
        report = await health.check(0.2)
        assert not report.ok and report.reason == "database: no answer within 0.2 s"
    assert database.queries == queries + 1  # the hung question is waited on, not asked again
    database.release.set()
    assert (await health.check()).ok
    await health.close()


async def test_under_a_scheduler_a_paused_scheduler_or_a_stuck_tick_is_unhealthy():
    metrics = Metrics()
    health = Health(FakeDatabase(), metrics, tick_stuck_seconds=0.2)  # type: ignore[arg-type]
    scheduler = Scheduler(lambda error: None, metrics)
    health.attach_scheduler(scheduler)
    assert (await health.check()).reason == "scheduler: not running"
    scheduler.start()
    try:
        assert (await health.check()).ok  # just started: no tick expected yet
        await asyncio.sleep(0.3)
        report = await health.check()
        assert not report.ok and report.reason.startswith("metering tick stuck")
        metrics.job_started(TICK_JOB)
        metrics.job_finished(TICK_JOB, failed=False)
        assert (await health.check()).ok
        scheduler.pause()
        assert (await health.check()).reason == "scheduler: paused (meterd is stopping)"
    finally:
        scheduler.shutdown()
