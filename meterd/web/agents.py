"""`/agents/*`: the agents' tools flag research (and, later, waivers and incident links)."""

from __future__ import annotations

from aiohttp import web

from meterd.web.app import SERVICES, read_json


async def research(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICES].research.flag(await read_json(request)))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/agents/research", research)
