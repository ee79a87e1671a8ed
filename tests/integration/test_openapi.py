"""`/openapi.json` (issue 16, acceptance 6): it describes every route and no route that does
not exist; and a schema-driven fuzz run (schemathesis) against the app, served in-process on
both backends, finds no 5xx and no answer the document does not allow. Bounded for CI by
METERD_OPENAPI_EXAMPLES (default 15 per operation)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from meterd.clock import system_clock
from meterd.config import load_settings
from meterd.metrics import Metrics
from meterd.store.database import open_database
from meterd.web.app import build_app, create_app
from meterd.web.openapi import DOCUMENT
from tests.e2e.daemon import free_port

from .twilio_app import ADMIN, AGENTS

FINANCE = "finance-token-0123456789abcdef"
EXAMPLES = int(os.environ.get("METERD_OPENAPI_EXAMPLES", "15"))
HEADERS = {"/admin/": ADMIN, "/agents/": AGENTS, "/finance/": FINANCE}
# an event stream never ends: it is tested in the browser (tests/e2e/test_desk_browser.py)
NOT_FUZZED = {"/desk/events"}


def _routes(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path:
            found.add((route.method.lower(), path))
    return found


def test_every_route_is_in_the_document_and_nothing_else(tmp_path):
    settings_ = load_settings(
        None, {"METERD_STATE_DIR": str(tmp_path), "METERD_ADMIN_TOKEN": ADMIN}
    )
    routes = _routes(build_app(settings_, Metrics()))
    documented = {
        (method, path) for path, operations in DOCUMENT["paths"].items() for method in operations
    }
    assert routes - documented == set(), "routes the document lacks"
    assert documented - routes == set(), "documented routes that do not exist"


@pytest.fixture
def served(database_url, tmp_path) -> Iterator[str]:
    """The app with every service, on a loopback port, in a thread with its own event loop."""
    port = free_port()
    started = threading.Event()
    loop = asyncio.new_event_loop()
    state: dict[str, object] = {}

    async def serve() -> None:
        settings_ = load_settings(
            None,
            {
                "METERD_STATE_DIR": str(tmp_path),
                "METERD_ADMIN_TOKEN": ADMIN,
                "METERD_AGENTS_TOKEN": AGENTS,
                "METERD_FINANCE_TOKEN": FINANCE,
                "METERD_PIN_SECRET": "pin-secret-0123456789abcdef",
                "METERD_TWILIO_AUTH_TOKEN": "twilio-token-0123456789abcdef",
            },
        )
        database = await open_database(database_url)
        runner = web.AppRunner(create_app(settings_, database, clock=system_clock))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        state.update(runner=runner, database=database)
        started.set()

    async def stop() -> None:
        await state["runner"].cleanup()  # type: ignore[attr-defined]
        await state["database"].close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=30)
    started.wait(30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.exclude(path=list(NOT_FUZZED)).parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_5xx_and_no_answer_the_document_does_not_allow(case, served):
    token = next((t for prefix, t in HEADERS.items() if case.path.startswith(prefix)), None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    case.call_and_validate(
        base_url=served,
        headers=headers,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
        allow_redirects=False,
    )
