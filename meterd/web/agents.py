"""`/agents/*`: the agents' tools flag research, waive a call's charges, link incidents."""

from __future__ import annotations

from aiohttp import web

from meterd.web.auth import bearer_token
from meterd.web.json_io import read_json
from meterd.web.keys import SERVICES

PREFIX = "/agents"
authenticate = bearer_token("agents_token", PREFIX + "/")


async def research(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].research.flag(await read_json(request))
    )


async def waiver(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].waivers.waive(await read_json(request))
    )


async def incident_link(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].incidents.link(await read_json(request))
    )


def subapp() -> web.Application:
    """The agents' sub-application, mounted at PREFIX by meterd/web/app.py (paths below are
    relative to it), behind the agents token."""
    app = web.Application(middlewares=[authenticate])
    app.router.add_post("/research", research)
    app.router.add_post("/waiver", waiver)
    app.router.add_post("/incident-link", incident_link)
    return app
