"""The vendored sd_notify helper against a notify socket the test opens: path and abstract
addresses, the watchdog interval and WATCHDOG_PID, pings only while healthy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterd import sdnotify


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket at a short path (AF_UNIX paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="sdn-"))
    path = directory / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(5)
    try:
        yield str(path), listener
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _drain(listener: socket.socket) -> list[str]:
    listener.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        listener.settimeout(5)
    return messages


def test_ready_status_watchdog_and_stopping_reach_a_path_socket(notify_socket):
    path, listener = notify_socket
    notifier = sdnotify.Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("ready: listening")
    assert notifier.watchdog("ok: 2 open calls\nsecond line")
    assert notifier.stopping("stopping")
    notifier.close()
    assert listener.recv(4096).decode() == "READY=1\nSTATUS=ready: listening"
    # a status is one line: a newline in it would start a new assignment
    assert listener.recv(4096).decode() == "WATCHDOG=1\nSTATUS=ok: 2 open calls second line"
    assert listener.recv(4096).decode() == "STOPPING=1\nSTATUS=stopping"


def test_an_abstract_socket_is_named_with_a_leading_at():
    name = f"meterd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        notifier = sdnotify.Notifier(f"@{name}")
        assert notifier.ready("ready")
        notifier.close()
        assert listener.recv(4096) == b"READY=1\nSTATUS=ready"


def test_without_a_notify_socket_nothing_is_sent_and_nothing_fails():
    notifier = sdnotify.Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready("ready")


def test_a_missing_socket_is_reported_not_raised(tmp_path):
    notifier = sdnotify.Notifier(str(tmp_path / "gone"))
    assert not notifier.watchdog("ok")
    assert not notifier.watchdog("ok")
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # someone else's watchdog
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(environ, interval):
    assert sdnotify.watchdog_interval_seconds(environ) == interval


async def test_the_watchdog_pings_only_while_the_check_passes(notify_socket):
    path, listener = notify_socket
    healthy = True

    async def check(timeout_seconds: float) -> tuple[bool, str]:
        assert timeout_seconds == pytest.approx(0.025)
        return healthy, "ok: 0 open calls" if healthy else "database: no answer"

    notifier = sdnotify.Notifier(path)
    task = asyncio.create_task(sdnotify.run_watchdog(notifier, check, 0.05))
    await asyncio.sleep(0.3)
    pinged = _drain(listener)
    healthy = False
    await asyncio.sleep(0.06)
    _drain(listener)  # a round may have begun before the change
    await asyncio.sleep(0.3)
    withheld = _drain(listener)
    healthy = True
    await asyncio.sleep(0.3)
    await _stop(task)
    resumed = _drain(listener)
    notifier.close()

    assert len(pinged) >= 3 and all(m == "WATCHDOG=1\nSTATUS=ok: 0 open calls" for m in pinged)
    assert len(withheld) >= 3
    assert all(m == "STATUS=unhealthy: database: no answer" for m in withheld)
    assert "WATCHDOG=1\nSTATUS=ok: 0 open calls" in resumed


async def test_a_check_that_raises_withholds_the_ping(notify_socket):
    path, listener = notify_socket

    async def check(timeout_seconds: float) -> tuple[bool, str]:
        raise RuntimeError("boom")

    notifier = sdnotify.Notifier(path)
    task = asyncio.create_task(sdnotify.run_watchdog(notifier, check, 0.05))
    await asyncio.sleep(0.2)
    await _stop(task)
    messages = _drain(listener)
    notifier.close()
    assert messages and all(m.startswith("STATUS=unhealthy: health check raised") for m in messages)


async def test_an_unresponsive_loop_withholds_the_ping(notify_socket):
    path, listener = notify_socket

    async def check(timeout_seconds: float) -> tuple[bool, str]:
        return True, "ok"

    notifier = sdnotify.Notifier(path)
    task = asyncio.create_task(
        sdnotify.run_watchdog(notifier, check, 0.05, loop_lag_max_seconds=-1.0)
    )
    await asyncio.sleep(0.2)
    await _stop(task)
    messages = _drain(listener)
    notifier.close()
    assert messages and all(m.startswith("STATUS=unhealthy: event loop") for m in messages)


async def test_without_a_watchdog_status_is_still_sent_but_never_a_ping(notify_socket, monkeypatch):
    path, listener = notify_socket
    monkeypatch.setattr(sdnotify, "STATUS_INTERVAL_SECONDS", 0.05)

    async def check(timeout_seconds: float) -> tuple[bool, str]:
        return True, "ok"

    notifier = sdnotify.Notifier(path)
    task = asyncio.create_task(sdnotify.run_watchdog(notifier, check, None))
    await asyncio.sleep(0.2)
    await _stop(task)
    messages = _drain(listener)
    notifier.close()
    assert messages and all(m == "STATUS=ok" for m in messages)
