"""`meterd demo` (issue 13): the one command a newcomer runs. It starts a throw-away daemon,
simulates calls against it, prints the summary and where to look, stops the daemon cleanly and
removes its directory (or keeps it with --keep)."""

from __future__ import annotations

import re
from pathlib import Path

from .daemon import run_cli

SECRETS = {"admin_token", "agents_token", "finance_token", "pin_secret", "twilio_auth_token"}


def test_demo_runs_the_simulation_and_keeps_its_directory_only_when_asked(tmp_path):
    # TMPDIR: the throw-away directory is made here; no METERD_* setting reaches the demo
    env = {"TMPDIR": str(tmp_path), "METERD_LISTEN": "nonsense", "METERD_ADMIN_TOKEN": "short"}
    kept = run_cli(["demo", "--calls", "12", "--seed", "13", "--keep"], env, tmp_path)
    output = kept.stdout + kept.stderr
    assert kept.returncode == 0, output
    assert "OK: all 12 calls matched the expectation (seed 13)." in kept.stdout
    assert "meterd simulation: 12 calls" in kept.stdout
    assert len(re.findall(r"http://127\.0\.0\.1:\d+/admin/calls/CA[0-9a-f]{32}\n", output)) == 2
    assert "/finance/usage/" in kept.stdout
    assert "stopped meterd (SIGTERM): exit status 0" in kept.stdout
    directory = Path(re.search(r"^kept (\S+);", kept.stdout, re.MULTILINE).group(1))
    assert directory.parent == tmp_path
    assert {p.name for p in (directory / "secrets").iterdir()} == SECRETS
    assert (directory / "meterd.sqlite3").exists()
    assert "stopped" in (directory / "meterd.log").read_text()

    removed = run_cli(["demo", "--calls", "3"], env, tmp_path)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "OK: all 3 calls matched" in removed.stdout
    gone = Path(re.search(r"^removed (\S+) ", removed.stdout, re.MULTILINE).group(1))
    assert gone.parent == tmp_path and not gone.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]
