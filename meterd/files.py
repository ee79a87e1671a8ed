"""Durable file replacement: the one way meterd puts a finished file in place.

A file is written beside its final name, fsynced, renamed over the final name (atomic on POSIX:
a reader sees the old file or the new one, never half of one), and the directory is fsynced so
the rename itself survives a crash. The usage files, `meterd db backup` and the webhook journal's
applied mark all go through here. (Generated tokens do not: the first writer must win, so they
are linked into place rather than renamed over one another; see `config.write_new_secret`.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_durably(moves: Iterable[tuple[Path, Path]]) -> None:
    """Rename each (temporary, final) pair, already written and fsynced, into place; then make
    the renames durable (once per directory)."""
    directories: set[Path] = set()
    for temporary, final in moves:
        os.replace(temporary, final)
        directories.add(final.parent)
    for directory in sorted(directories):
        fsync_directory(directory)


def fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data`, durably: the file holds the old bytes or the new ones."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably([(temporary, path)])
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
