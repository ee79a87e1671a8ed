"""The daemon's lifecycle (meterd/daemon.py `Lifecycle`): database, adapters, services, scheduler
and notifier are aiohttp cleanup contexts, so a start that fails at any step stops exactly what
had started before it, in reverse order, and a stop stops every step in reverse. `serve` runs
in-process here, on SQLite in a temporary state directory, with no Twilio or Stripe configured."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from meterd import bootstrap, daemon, sdnotify
from meterd.config import load_settings
from meterd.web.health import Health
from tests.e2e.daemon import free_port

STARTED = ["database opened", "adapters opened", "scheduler created"]
STOPPED = [
    "notifier closed",
    "scheduler shut down",
    "health closed",
    "adapters closing",
    "database closing",
]


def _settings(tmp_path: Any, port: int) -> Any:
    return load_settings(
        None, {"METERD_STATE_DIR": str(tmp_path / "var"), "METERD_LISTEN": f"127.0.0.1:{port}"}
    )


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each step did, in order (the real steps, with a note as each starts and stops)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    events: list[str] = []
    real_create_scheduler = daemon.create_scheduler
    real_health_close, real_notifier_close = Health.close, sdnotify.Notifier.close

    def noted(step: str, real: Any) -> Any:
        @asynccontextmanager
        async def wrapped(settings: Any) -> AsyncIterator[Any]:
            async with real(settings) as opened:
                events.append(f"{step} opened")
                try:
                    yield opened
                finally:
                    events.append(f"{step} closing")

        return wrapped

    def create_scheduler(*args: Any) -> Any:
        scheduler = real_create_scheduler(*args)
        shutdown = scheduler.shutdown

        def noted_shutdown() -> None:
            events.append("scheduler shut down")
            shutdown()

        scheduler.shutdown = noted_shutdown  # type: ignore[method-assign]
        events.append("scheduler created")
        return scheduler

    async def health_close(self: Health, app: Any = None) -> None:
        events.append("health closed")
        await real_health_close(self, app)

    def notifier_close(self: sdnotify.Notifier) -> None:
        events.append("notifier closed")
        real_notifier_close(self)

    monkeypatch.setattr(bootstrap, "database", noted("database", bootstrap.database))
    monkeypatch.setattr(bootstrap, "adapters", noted("adapters", bootstrap.adapters))
    monkeypatch.setattr(daemon, "create_scheduler", create_scheduler)
    monkeypatch.setattr(Health, "close", health_close)
    monkeypatch.setattr(sdnotify.Notifier, "close", notifier_close)
    return events


async def test_a_step_that_fails_stops_the_steps_before_it_in_reverse(
    tmp_path: Any, steps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("the scheduler cannot start")

    monkeypatch.setattr(daemon, "create_scheduler", broken)
    with pytest.raises(RuntimeError, match="the scheduler cannot start"):
        await daemon.serve(_settings(tmp_path, free_port()))
    assert steps == [
        "database opened",
        "adapters opened",
        "health closed",
        "adapters closing",
        "database closing",
    ]


async def test_an_address_in_use_stops_every_step_in_reverse_and_exits_1(
    tmp_path: Any, steps: list[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = await daemon.serve(_settings(tmp_path, port))
    assert status == daemon.EXIT_STARTUP_FAILED
    assert steps == STARTED + STOPPED


async def test_a_signal_stops_every_step_in_reverse_after_serving(
    tmp_path: Any, steps: list[str]
) -> None:
    port = free_port()
    serving = asyncio.create_task(daemon.serve(_settings(tmp_path, port)))
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            assert not serving.done(), serving.result()
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert response.status == 200, await response.text()
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("meterd did not answer /healthz")
    assert steps == STARTED
    os.kill(os.getpid(), signal.SIGTERM)  # serve handles it from the moment it listens
    assert await asyncio.wait_for(serving, 30) == daemon.EXIT_OK
    assert steps == STARTED + STOPPED
