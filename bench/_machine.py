"""What every bench script writes beside its figures: date, machine, commit."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    memory_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"{memory_kib / 1024 / 1024:.1f} GiB, Python {platform.python_version()}, "
        f"commit {commit}{'+changes' if dirty.strip() else ''}"
    )


def append(title: str, lines: list[str]) -> None:
    text = f"\n## {title}\n\n{machine()}\n\n" + "\n".join(lines) + "\n"
    print(text)
    with RESULTS.open("a") as results:
        results.write(text)
