"""The keys of what the web app holds (`app[KEY]`), all set on the root application.

A leaf of meterd.web: it imports no route module, so every route module, middleware and the
daemon can import the keys without importing the app (which imports the route modules).

Inside a caller's sub-application `request.app` is that sub-application: read these with
`request.config_dict[KEY]`, which looks through the sub-application to the root one."""

from __future__ import annotations

from aiohttp import web

from meterd.bootstrap import Services
from meterd.metrics import METRICS
from meterd.web.connections import CONNECTION_LIMITS
from meterd.web.health import Health

__all__ = ["CONNECTION_LIMITS", "HEALTH", "METRICS", "SERVICES"]

SERVICES = web.AppKey("services", Services)
"""Every service (meterd.bootstrap.build_services); set by `meterd.web.app.install_services`."""

HEALTH = web.AppKey("health", Health)
"""The health check behind `/healthz`, `/metrics` and the systemd watchdog."""
