"""The README's two commands are true: the first starts meterd from a clean copy with no config,
the second is what `.ci/run` runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from .daemon import free_port

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# ")
    start = lines.index("```")
    end = lines.index("```", start + 1)
    return lines[start + 1 : end]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_second():
    commands = _readme_commands()
    assert len(commands) == 2
    setup, tests = commands
    assert "pip install -e ." in setup and setup.endswith("meterd run")
    assert tests.endswith(".venv/bin/pytest -n 3 --dist loadgroup")  # tests/conftest.py's groups
    extracted = subprocess.run(
        ["bash", "-c", "awk '/^```/{fence++; next} fence==1' README.md | sed -n 2p"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == tests
    assert (
        "awk '/^```/{fence++; next} fence==1' README.md | sed -n 2p"
        in (ROOT / ".ci" / "run").read_text()
    )


def _clean_copy(destination: Path) -> None:
    """The files a clean clone would have: tracked and untracked-but-not-ignored ones."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def test_first_command_on_a_clean_copy_gives_a_healthy_daemon(tmp_path):
    checkout = tmp_path / "meterd"
    _clean_copy(checkout)
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("METERD_") and k != "VIRTUAL_ENV"
    }
    env["METERD_LISTEN"] = f"127.0.0.1:{port}"  # the one change: a free port
    setup = _readme_commands()[0]
    log = (tmp_path / "setup.log").open("w")
    process = subprocess.Popen(
        ["bash", "-c", setup],
        cwd=checkout,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(0.5)
        assert status == 200, (tmp_path / "setup.log").read_text()[-3000:]
        assert (checkout / "var" / "meterd.sqlite3").exists()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()
