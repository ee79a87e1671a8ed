"""`/healthz` and `/metrics`: open, for operations (bind to loopback or firewall them). What the
health check checks, and why it says little: meterd/web/health.py.

Operations are the one caller without a prefix of their own, so these routes are on the root
application itself (aiohttp mounts sub-applications under a non-empty prefix only), with no
authentication middleware."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meterd.web import openapi
from meterd.web.keys import HEALTH, METRICS


async def healthz(request: web.Request) -> web.Response:
    report = await request.config_dict[HEALTH].check()
    if report.degraded:
        return web.json_response(
            {
                "status": "degraded",
                "reason": report.degraded,
                "database": report.database,
                "journal_entries": report.journal_entries,
            }
        )
    if report.ok:
        return web.json_response({"status": "ok"})
    return web.json_response(
        {"status": "unhealthy", "reason": report.reason, "database": report.database}, status=503
    )


async def metrics(request: web.Request) -> web.Response:
    await request.config_dict[HEALTH].check()  # refreshes meterd_open_calls and meterd_healthy
    return web.Response(
        body=generate_latest(request.config_dict[METRICS].registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


def add_routes(app: web.Application) -> None:
    """On the root application (see above)."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi.openapi_json)
