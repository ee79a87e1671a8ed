"""Bearer tokens: each caller with a token (admin, agents, finance) has its own sub-application,
mounted under its prefix with `bearer_token` as its middleware, so a token opens its own prefix
only and every path under that prefix needs it, routes and unknown paths alike (401 or 403
before a 404 or 405). Twilio's webhooks are authenticated by their signature instead
(meterd/web/twilio.py); `/healthz` and `/metrics` are open.

Two kinds of path meet a sub-application's prefix without being under it, and keep the answers
they always had: the prefix itself ("/admin": the sub-application sees it, no route serves it, a
404 with or without a token), and a path whose slash after the prefix is percent-encoded
("/admin%2Faccounts": the router sends it to no sub-application, but it reads as under "/admin/"
once decoded, so the root application's `unrouted_paths` asks for that prefix's token before its
404)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from meterd.logs import get_logger
from meterd.web.json_io import json_error
from meterd.web.keys import SERVICES

log = get_logger("meterd.web")


def bearer_token(secret_name: str, prefix: str) -> Middleware:
    """A middleware letting through only requests with `Authorization: Bearer <the secret
    named secret_name>` among those under `prefix` ("/admin/"), which is what the token opens."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(prefix):  # the prefix itself, without its slash
            return await handler(request)
        expected = request.config_dict[SERVICES].settings.secret(secret_name)
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return json_error(
                401,
                "unauthorized",
                f"send Authorization: Bearer <{secret_name.replace('_', ' ')}>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
            log.warning("wrong token", path=request.path)
            return json_error(403, "forbidden", f"this token does not open {prefix}*")
        return await handler(request)

    return authenticate


def unrouted_paths(guards: Mapping[str, Middleware]) -> Middleware:
    """A middleware for the root application: a request the router sent to no sub-application
    (so a 404 or 405, or an open route) whose decoded path is under one of `guards`' prefixes
    goes through that prefix's token check first (the module's docstring says which)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if len(request.match_info.apps) == 1:  # the root application's own
            for prefix, authenticate in guards.items():
                if request.path.startswith(prefix):
                    return await authenticate(request, handler)
        return await handler(request)

    return guard
