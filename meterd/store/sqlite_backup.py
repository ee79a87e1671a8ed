"""`meterd db backup`'s work on the database (meterd/cli.py does the files and the messages):
where the SQLite file is, and a consistent copy of it taken with sqlite3's online backup API.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import make_url


class BackupFailed(Exception):
    """SQLite could not copy the database, or the copy fails its integrity check."""


def sqlite_file(database_url: str) -> str | None:
    """The database file a SQLite URL names ('' or ':memory:' for none); None if the URL is
    not SQLite."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return None
    return url.database or ""


def copy_database(source: Path, copy_path: Path, *, busy_timeout_seconds: float) -> int:
    """Copy `source` into the (empty) file `copy_path` in one read transaction, so the copy is
    a consistent snapshot while the daemon goes on writing (WAL); make it self-contained (no
    -wal file) and check its integrity. Never changes `source`. Returns the copy's page count."""
    try:
        # mode=rw: never create a database that is not there
        with (
            contextlib.closing(
                sqlite3.connect(
                    f"file:{quote(str(source))}?mode=rw", uri=True, timeout=busy_timeout_seconds
                )
            ) as original,
            contextlib.closing(sqlite3.connect(copy_path)) as copy,
        ):
            original.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
            integrity = copy.execute("PRAGMA integrity_check").fetchone()[0]
            pages = int(copy.execute("PRAGMA page_count").fetchone()[0])
    except sqlite3.Error as error:
        raise BackupFailed(str(error)) from error
    if integrity != "ok":
        raise BackupFailed(f"the copy fails its integrity check: {integrity}")
    return pages
