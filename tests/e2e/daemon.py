"""Start and stop the real `meterd run` process for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

METERD = str(Path(sys.executable).parent / "meterd")
ADMIN_TOKEN = "e2e-admin-token-0123456789"
START_TIMEOUT_SECONDS = 30
E2E_TWILIO_CLOCK_SKEW_SECONDS = str(24 * 3600)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Daemon:
    def __init__(
        self, cwd: Path, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("METERD_")}
        self.env.update(
            {
                "METERD_LISTEN": f"127.0.0.1:{self.port}",
                "METERD_ADMIN_TOKEN": ADMIN_TOKEN,
                # The e2e tests (and `meterd simulate`) replay calls that happened up to an hour
                # or so ago, after answering their voice webhook now: let their conference
                # events through. The default (300 s) is tested in-process; pass a smaller value
                # in `env` to test it here.
                "METERD_TWILIO_CLOCK_SKEW_SECONDS_MAX": E2E_TWILIO_CLOCK_SKEW_SECONDS,
                **(env or {}),
            }
        )
        self.args = args or []
        self.process: subprocess.Popen[str] | None = None
        self.log_path = cwd / f"meterd-{self.port}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [METERD, *self.args, "run"],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"meterd exited {self.process.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"meterd did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.request(method, path, body, token=ADMIN_TOKEN)


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERD_")}
    return subprocess.run(
        [METERD, *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
