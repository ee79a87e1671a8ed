"""An idempotency conflict met while answering a request (a key reused with other content) is
a 409 and the daemon goes on (issue 14): the ledger kept the first content, nothing is broken.
Only a broken money invariant stops the daemon (tests/e2e/test_metering_daemon.py)."""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from meterd.store.database import open_database
from meterd.store.ledger_store import IdempotencyConflict

from .twilio_app import ManualClock, build_app

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)


async def test_an_idempotency_conflict_is_409_and_not_a_stop(aiohttp_client, tmp_path):
    async def conflicting(request: web.Request) -> web.Response:
        raise IdempotencyConflict("deposit:acme:d1 was posted before with other content")

    database = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'meterd.sqlite3'}")
    try:
        app = build_app(database, tmp_path, ManualClock(START))  # a stop would raise: a 500
        app.router.add_post("/conflict", conflicting)
        client = await aiohttp_client(app)
        response = await client.post("/conflict")
        assert response.status == 409
        assert (await response.json())["error"] == "idempotency_conflict"
        assert (await client.get("/healthz")).status == 200
    finally:
        await database.close()
