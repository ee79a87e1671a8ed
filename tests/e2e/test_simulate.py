"""Smoke run of the traffic simulator against a fresh, real `meterd run`: 20 signed calls, once
as Twilio sends them and once with duplicates and reordering; the simulator checks every call's
charges against its own expectation and exits 0 only if all matched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .daemon import ADMIN_TOKEN, Daemon

TWILIO_TOKEN = "e2e-sim-twilio-token-0123456789"
AGENTS_TOKEN = "e2e-sim-agents-token-0123456789"
PUBLIC_BASE_URL = "https://calls.example.com/meterd"  # Twilio's view, with a path prefix
SETTLE_DELAY_SECONDS = "2"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    daemon = Daemon(
        tmp_path_factory.mktemp("simulate"),
        env={
            "METERD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "METERD_AGENTS_TOKEN": AGENTS_TOKEN,
            "METERD_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "METERD_SETTLE_DELAY_SECONDS": SETTLE_DELAY_SECONDS,
        },
    ).start()
    yield daemon
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("flags", "seed"), [([], "11"), (["--duplicates", "--reorder"], "12")], ids=["plain", "messy"]
)
def test_simulated_calls_are_charged_as_the_rules_say(daemon, flags, seed):
    env = {
        "METERD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "METERD_ADMIN_TOKEN": ADMIN_TOKEN,
        "METERD_AGENTS_TOKEN": AGENTS_TOKEN,
        "METERD_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        "METERD_SETTLE_DELAY_SECONDS": SETTLE_DELAY_SECONDS,
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "meterd.simulate",
            "--url",
            daemon.base_url,
            "--calls",
            "20",
            "--cps",
            "20",
            "--seed",
            seed,
            "--max-call-seconds",
            "600",
            "--settle-timeout",
            "20",
            "--no-progress",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, (
        f"simulator exited {result.returncode}\n{result.stdout}\n{result.stderr}\n"
        f"meterd log tail:\n{daemon.log()[-3000:]}"
    )
    assert "OK: all 20 calls matched" in result.stdout
