"""`/healthz` and `/metrics`: open, for operations (bind to loopback or firewall them)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from meterd.logs import get_logger
from meterd.web.app import SERVICES

log = get_logger("meterd.health")
DATABASE_PING_TIMEOUT_SECONDS = 2.0


async def healthz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        await asyncio.wait_for(services.database.ping(), DATABASE_PING_TIMEOUT_SECONDS)
    except Exception as error:  # any failure to answer is a reason to be unhealthy
        log.warning("health check failed", reason="database", error=repr(error))
        return web.json_response(
            {"status": "unhealthy", "reason": f"database: {error!r}"[:300]}, status=503
        )
    return web.json_response({"status": "ok"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
