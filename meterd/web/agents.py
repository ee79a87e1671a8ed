"""`/agents/*`: the agents' tools flag research, waive a call's charges, link incidents, and
ring customers back."""

from __future__ import annotations

from aiohttp import web

from meterd.services.callbacks import CallbacksOff, NotPlaced
from meterd.web.auth import bearer_token
from meterd.web.json_io import json_error, read_json
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


async def callback(request: web.Request) -> web.Response:
    """201 with the callback Twilio is ringing; 200 with the one its reference already names;
    502 with the callback when Twilio did not place it; 503 when callbacks are off."""
    try:
        view, placed = await request.config_dict[SERVICES].callbacks.request(
            await read_json(request)
        )
    except NotPlaced as failed:
        return web.json_response(
            {"error": failed.code, "detail": failed.detail, "callback": failed.view}, status=502
        )
    except CallbacksOff as off:
        return json_error(503, off.code, off.detail)
    return web.json_response(view, status=201 if placed else 200)


async def callback_view(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].callbacks.view(request.match_info["callback_id"])
    )


def subapp() -> web.Application:
    """The agents' sub-application, mounted at PREFIX by meterd/web/app.py (paths below are
    relative to it), behind the agents token."""
    app = web.Application(middlewares=[authenticate])
    app.router.add_post("/research", research)
    app.router.add_post("/waiver", waiver)
    app.router.add_post("/incident-link", incident_link)
    app.router.add_post("/callbacks", callback)
    app.router.add_get("/callbacks/{callback_id}", callback_view)
    return app
