"""A day's usage files, written atomically under `<state_dir>/usage/`.

Each file is written to a temporary file in the same directory (hashed as it is written),
fsynced, renamed into place, and the directory fsynced (`BuiltFiles.commit`), before the run is
recorded as published with the files' SHA-256. Temporary files a build that died left behind are
removed by the next build of the day (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from meterd.files import replace_durably


class UsageFile(StrEnum):
    ACCOUNTS_CSV = "accounts_csv"
    ACCOUNTS_JSON = "accounts_json"
    CALLS_CSV = "calls_csv"

    def file_name(self, day: dt.date) -> str:
        return {
            UsageFile.ACCOUNTS_CSV: f"{day.isoformat()}.csv",
            UsageFile.ACCOUNTS_JSON: f"{day.isoformat()}.json",
            UsageFile.CALLS_CSV: f"{day.isoformat()}.calls.csv",
        }[self]

    @property
    def sha_column(self) -> str:
        return f"{self.value}_sha256"


class TempFile:
    """A file written beside its final name, hashed as it is written, renamed into place."""

    def __init__(self, directory: Path, final_name: str) -> None:
        self.final = directory / final_name
        self.path = directory / f".{final_name}.{uuid.uuid4().hex}.tmp"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._file = os.fdopen(descriptor, "wb", buffering=1 << 20)
        self._hash = hashlib.sha256()

    def write(self, text_: str) -> None:
        data = text_.encode("utf-8")
        self._hash.update(data)
        self._file.write(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close_synced(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


@dataclass
class BuiltFiles:
    """A day's files, written to temporary files, not yet in place."""

    day: dt.date
    files: dict[UsageFile, TempFile] = field(default_factory=dict)
    accounts: int = 0
    calls_rows: int = 0

    @property
    def sha256(self) -> dict[UsageFile, str]:
        return {kind: f.sha256 for kind, f in self.files.items()}

    def discard(self) -> None:
        for temporary in self.files.values():
            temporary.discard()

    def commit(self) -> None:
        """Rename every file into place, then make the renames durable."""
        replace_durably((temporary.path, temporary.final) for temporary in self.files.values())


def remove_stale_temporaries(directory: Path, day: dt.date, older_than_seconds: int) -> None:
    """Temporary files of the day left by a build that died (older than any live build's)."""
    older_than = time.time() - older_than_seconds
    for path in directory.glob(f".{day.isoformat()}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < older_than:
                path.unlink()


def sha256_of(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return None
