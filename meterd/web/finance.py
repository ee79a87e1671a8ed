"""`/finance/*`: finance pulls a business day's usage (the finance token only: `subapp`).

    GET /finance/usage/{YYYY-MM-DD}.csv        per account
    GET /finance/usage/{YYYY-MM-DD}.json       per account, with totals
    GET /finance/usage/{YYYY-MM-DD}/calls.csv  per call
    GET /finance/reconciliation/{YYYY-MM-DD}.json|.csv  the day against Twilio's call records

400 for a date that does not exist or is not written YYYY-MM-DD; 404 for a day that has not
closed, is in the future or has not been built yet; 409 for a day whose report was refused (the
detail says why). A day's files never change once published.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from meterd.core.usage import InvalidBusinessDay, parse_business_day
from meterd.logs import get_logger
from meterd.services.reconciliation import (
    ReconciliationNotReady,
    ReconciliationOff,
    report_csv,
)
from meterd.services.usage import (
    LedgerBroken,
    UsageFile,
    UsageMismatch,
    UsageNotReady,
    UsageRefused,
)
from meterd.web.auth import bearer_token
from meterd.web.json_io import json_error
from meterd.web.keys import SERVICES

log = get_logger("meterd.finance")

PREFIX = "/finance"
authenticate = bearer_token("finance_token", PREFIX + "/")

_CONTENT_TYPES = {
    UsageFile.ACCOUNTS_CSV: "text/csv; charset=utf-8; header=present",
    UsageFile.ACCOUNTS_JSON: "application/json",
    UsageFile.CALLS_CSV: "text/csv; charset=utf-8; header=present",
}
_DOWNLOAD_NAMES = {
    UsageFile.ACCOUNTS_CSV: "usage-{day}.csv",
    UsageFile.ACCOUNTS_JSON: "usage-{day}.json",
    UsageFile.CALLS_CSV: "usage-{day}-calls.csv",
}


async def _serve(request: web.Request, kind: UsageFile) -> web.StreamResponse:
    try:
        day = parse_business_day(request.match_info["day"])
    except InvalidBusinessDay as error:
        return json_error(400, "invalid_date", str(error))
    try:
        path = await request.config_dict[SERVICES].usage.published_file(day, kind)
    except UsageNotReady as error:
        return json_error(404, "usage_not_ready", str(error))
    except LedgerBroken:
        raise  # a broken money invariant: the error middleware answers 500 and stops meterd
    except UsageRefused as error:
        return json_error(409, "usage_refused", str(error))
    except UsageMismatch as error:
        return json_error(500, "usage_mismatch", str(error))
    name = _DOWNLOAD_NAMES[kind].format(day=day.isoformat())
    return web.FileResponse(
        path,
        headers={
            "Content-Type": _CONTENT_TYPES[kind],
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


async def accounts_csv(request: web.Request) -> web.StreamResponse:
    return await _serve(request, UsageFile.ACCOUNTS_CSV)


async def accounts_json(request: web.Request) -> web.StreamResponse:
    return await _serve(request, UsageFile.ACCOUNTS_JSON)


async def calls_csv(request: web.Request) -> web.StreamResponse:
    return await _serve(request, UsageFile.CALLS_CSV)


async def _reconciliation(request: web.Request) -> dict[str, Any] | web.Response:
    """The kept reconciliation report of a day, or the refusal to answer."""
    try:
        day = parse_business_day(request.match_info["day"])
    except InvalidBusinessDay as error:
        return json_error(400, "invalid_date", str(error))
    try:
        return await request.config_dict[SERVICES].reconciliation.report(day)
    except ReconciliationOff as error:
        return json_error(404, "reconciliation_off", str(error))
    except ReconciliationNotReady as error:
        return json_error(404, "reconciliation_not_ready", str(error))


async def reconciliation_json(request: web.Request) -> web.Response:
    report = await _reconciliation(request)
    return report if isinstance(report, web.Response) else web.json_response(report)


async def reconciliation_csv(request: web.Request) -> web.Response:
    report = await _reconciliation(request)
    if isinstance(report, web.Response):
        return report
    return web.Response(
        text=report_csv(report),
        headers={
            "Content-Type": _CONTENT_TYPES[UsageFile.CALLS_CSV],
            "Content-Disposition": (
                f'attachment; filename="reconciliation-{report["business_day"]}.csv"'
            ),
        },
    )


def subapp() -> web.Application:
    """Finance's sub-application, mounted at PREFIX by meterd/web/app.py (paths below are
    relative to it), behind the finance token."""
    app = web.Application(middlewares=[authenticate])
    app.router.add_get("/usage/{day}.csv", accounts_csv)
    app.router.add_get("/usage/{day}.json", accounts_json)
    app.router.add_get("/usage/{day}/calls.csv", calls_csv)
    app.router.add_get("/reconciliation/{day}.json", reconciliation_json)
    app.router.add_get("/reconciliation/{day}.csv", reconciliation_csv)
    return app
