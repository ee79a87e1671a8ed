"""systemd/meterd.service: `systemd/check-unit` passes (verify silent, security exposure <= 2.0),
fails on a warning or weak hardening, and the unit says what the daemon needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meterd.config import SECRETS, SETTINGS_BY_NAME

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "meterd.service"
CHECK = ROOT / "systemd" / "check-unit"


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def _run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(directory / "check-unit")], capture_output=True, text=True, timeout=120
    )


def test_check_unit_passes_verify_and_scores_at_most_2():
    result = _run_check(CHECK.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify is silent" in result.stdout
    score = re.search(r"Overall exposure level for meterd\.service: (\d+\.\d+)", result.stdout)
    assert score and float(score[1]) <= 2.0, result.stdout


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda text: text.replace("WatchdogSec=30s", "WatchdogSecs=30s"), "verify printed"),
        (lambda text: text.replace("TimeoutStopSec=50s", "TimeoutStopSec=fifty"), "verify printed"),
        (
            lambda text: "\n".join(
                line
                for line in text.splitlines()
                if not line.startswith(("Protect", "Private", "Restrict", "SystemCall"))
            ),
            "exposure",
        ),
    ],
    ids=["unknown-key", "bad-value", "weak-hardening"],
)
def test_check_unit_fails_on_a_warning_or_weak_hardening(tmp_path, change, says):
    shutil.copy2(CHECK, tmp_path / "check-unit")
    (tmp_path / "meterd.service").write_text(change(UNIT.read_text()))
    result = _run_check(tmp_path)
    assert result.returncode != 0
    assert says in result.stderr


def test_unit_is_a_notify_service_with_watchdog_and_restart():
    unit = _directives()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["StateDirectory"] == ["meterd"]
    assert unit["StateDirectoryMode"] == ["0700"]
    assert unit["ExecStart"] == ["/usr/local/bin/meterd run"]


def test_every_secret_is_a_systemd_credential():
    credentials = set(_directives()["LoadCredential"])
    assert credentials == {f"{s.name}:/etc/meterd/secrets/{s.name}" for s in SECRETS}


def test_stop_timeout_covers_the_tick_and_the_in_flight_requests():
    # a stop waits up to shutdown_timeout_seconds for the tick, then as long for requests
    shutdown_timeout_seconds = SETTINGS_BY_NAME["shutdown_timeout_seconds"].default
    assert _seconds(_directives()["TimeoutStopSec"][0]) > 2 * shutdown_timeout_seconds
