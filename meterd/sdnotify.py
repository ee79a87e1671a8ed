"""sd_notify, vendored: tell systemd that meterd is ready, what it is doing, that it is alive, and
that it is stopping. (The `sdnotify` package has had no release since 2017; the protocol is a
few datagrams.)

Each message is a datagram of `KEY=value` lines (`READY=1`, `STATUS=...`, `WATCHDOG=1`,
`STOPPING=1`) sent to the AF_UNIX socket named by `$NOTIFY_SOCKET`: a path, or an abstract socket
when it starts with `@`. Without `$NOTIFY_SOCKET` (not under systemd, or not `Type=notify`) every
call does nothing. Sending never blocks and never raises: a lost status line must not stop the
daemon.

The watchdog (`run_watchdog`) pings every `$WATCHDOG_USEC / 2`, honouring `$WATCHDOG_PID`, and only
while its health check passes, so systemd restarts a daemon that is hung or cannot do its work
(`WatchdogSec=`). A blocked event loop cannot run the watchdog at all, which is the same thing.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

from meterd.logs import get_logger

log = get_logger("meterd.sdnotify")

# With a notify socket but no watchdog, STATUS= is still refreshed this often.
STATUS_INTERVAL_SECONDS = 15.0
# A callback that waits longer than this for the event loop means the loop is not responsive.
LOOP_LAG_MAX_SECONDS = 1.0

# (timeout_seconds) -> (healthy, one status line)
HealthCheck = Callable[[float], Awaitable[tuple[bool, str]]]


class Notifier:
    """Sends sd_notify datagrams to one socket address; does nothing without one."""

    def __init__(self, address: str | None) -> None:
        self._address = _socket_address(address) if address else None
        self._socket: socket.socket | None = None
        self._failed_before = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one datagram; True if it was sent."""
        if self._address is None:
            return False
        message = "\n".join(line.replace("\n", " ") for line in assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as error:  # systemd gone, queue full: never worth stopping for
            if not self._failed_before:
                log.warning("cannot send to the systemd notify socket", error=str(error))
                self._failed_before = True
            return False
        self._failed_before = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self, status: str) -> bool:
        return self.send("WATCHDOG=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str:
    # Linux abstract namespace: '@name' in the environment is '\0name' on the wire.
    return "\0" + address[1:] if address.startswith("@") else address


def watchdog_interval_seconds(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """How often to ping: half of `$WATCHDOG_USEC`; None when there is no watchdog for us (unset,
    unparsable, or `$WATCHDOG_PID` names another process)."""
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC", "")
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    return int(usec_text) / 1_000_000 / 2


async def loop_lag_seconds() -> float:
    """How long a ready callback waits for the event loop right now."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(0)
    return loop.time() - started


async def run_watchdog(
    notifier: Notifier,
    check: HealthCheck,
    interval_seconds: float | None,
    *,
    loop_lag_max_seconds: float = LOOP_LAG_MAX_SECONDS,
) -> None:
    """Until cancelled: every `interval_seconds`, run `check`; while it passes send `WATCHDOG=1`
    with a STATUS line, otherwise only a STATUS line saying why. With no watchdog
    (`interval_seconds` None) STATUS is still refreshed every `STATUS_INTERVAL_SECONDS`."""
    if not notifier.enabled:
        return
    period = interval_seconds or STATUS_INTERVAL_SECONDS
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    healthy_before = True
    while True:
        lag = await loop_lag_seconds()
        if lag > loop_lag_max_seconds:
            healthy, text = False, f"event loop not responsive: a callback waited {lag:.1f} s"
        else:
            try:
                healthy, text = await check(period / 2)
            except Exception as error:  # a broken check is a failed check, never a crash
                healthy, text = False, f"health check raised {error!r}"
        if healthy and interval_seconds is not None:
            notifier.watchdog(text)
        else:
            notifier.status(text if healthy else f"unhealthy: {text}")
        if healthy != healthy_before and interval_seconds is not None:
            if healthy:
                log.info("healthy again; pinging the systemd watchdog", status=text)
            else:
                log.warning("unhealthy; not pinging the systemd watchdog", reason=text)
        healthy_before = healthy
        next_at = max(next_at + period, loop.time())
        await asyncio.sleep(next_at - loop.time())
