"""localstripe (a stateful Stripe API server from PyPI) on a loopback port, for tests.

Started as its own process through a small launcher, because its CLI binds every interface.
It keeps state in memory (and pickles it to /tmp after every write, which it never reloads
here). `stop()` kills it, which is how tests make "the gateway is down".
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

LAUNCHER = """
import sys
from aiohttp import web
from localstripe.server import app
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
SECRET_KEY = "sk_test_meterd_0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalStripe:
    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalStripe:
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.base_url}/v1/customers", timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # it answers (401 without a key): it is up
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("localstripe did not start")

    def reset(self) -> None:
        """Forget every customer, card and payment (between tests)."""
        request = urllib.request.Request(f"{self.base_url}/_config/data", method="DELETE")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
