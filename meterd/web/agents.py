"""`/agents/*`: the agents' tools flag research, waive a call's charges, link incidents."""

from __future__ import annotations

from aiohttp import web

from meterd.web.app import SERVICES, read_json


async def research(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICES].research.flag(await read_json(request)))


async def waiver(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICES].waivers.waive(await read_json(request)))


async def incident_link(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICES].incidents.link(await read_json(request)))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/agents/research", research)
    app.router.add_post("/agents/waiver", waiver)
    app.router.add_post("/agents/incident-link", incident_link)
