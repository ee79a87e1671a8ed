"""The webhook journal: Twilio callbacks taken while the database could not take them.

When the database cannot record a conference or call-status callback within a short bound,
meterd appends the (already verified) callback here, fsyncs, and only then answers 2xx; the
entries are applied to the database in order once it is back (`services/intake.py`). A callback
answered 2xx is therefore always either in the database or in this file.

The file, `<state_dir>/webhook-journal.log`, holds one entry per line:

    <crc32 of the JSON, 8 hex digits> <JSON: id, route, received_at, params>

A line cut short by a crash (its writer died before the fsync, so it was never acknowledged)
fails its checksum; it and anything after it are dropped when the journal is opened. Entry ids
only grow. `<state_dir>/webhook-journal.applied` holds the id of the last entry applied, replaced
atomically after each one; entries at or below it are done. Once every entry is applied the log
is truncated (ids keep growing, so the applied mark stays true). Applying an entry twice (a crash
between applying it and writing the mark) changes nothing: every callback has a dedup key.

One daemon per state directory (as for the SQLite file).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meterd.files import write_atomically
from meterd.logs import get_logger

log = get_logger("meterd.journal")

JOURNAL_FILE = "webhook-journal.log"
APPLIED_FILE = "webhook-journal.applied"
ROUTES = frozenset({"conference", "call-status"})


class JournalFull(Exception):
    """The journal holds `bytes_max` already: the callback must be refused (503, retried)."""


class JournalMisused(Exception):
    """A caller broke the journal's contract (an entry applied out of order, an unknown route):
    a programming error, raised whether or not Python runs with -O."""


@dataclass(frozen=True)
class JournalEntry:
    entry_id: int
    route: str  # "conference" or "call-status"
    received_at: dt.datetime  # when meterd took it: a call-status without Timestamp ends then
    params: list[tuple[str, str]]  # the signed form, as Twilio sent it

    def encode(self) -> bytes:
        body = json.dumps(
            {
                "id": self.entry_id,
                "route": self.route,
                "received_at": self.received_at.isoformat(),
                "params": self.params,
            },
            ensure_ascii=True,  # one line: no raw newline can appear in the JSON
            separators=(",", ":"),
        ).encode("ascii")
        return b"%08x %s\n" % (zlib.crc32(body), body)

    @classmethod
    def decode(cls, line: bytes) -> JournalEntry | None:
        """The entry, or None if the line is torn or damaged."""
        checksum, _, body = line.rstrip(b"\n").partition(b" ")
        try:
            if not line.endswith(b"\n") or int(checksum, 16) != zlib.crc32(body):
                return None
            data = json.loads(body)
            entry = cls(
                entry_id=int(data["id"]),
                route=str(data["route"]),
                received_at=dt.datetime.fromisoformat(data["received_at"]),
                params=[(str(name), str(value)) for name, value in data["params"]],
            )
        except (ValueError, KeyError, TypeError):
            return None
        return entry if entry.route in ROUTES and entry.received_at.tzinfo else None


class WebhookJournal:
    def __init__(self, directory: Path, *, bytes_max: int) -> None:
        if bytes_max <= 0:
            raise ValueError(f"the journal's size bound must be positive, got {bytes_max}")
        self.path = directory / JOURNAL_FILE
        self._applied_path = directory / APPLIED_FILE
        self.bytes_max = bytes_max
        self._lock = asyncio.Lock()
        self._pending: list[JournalEntry] = []  # appended, not yet applied; oldest first
        self._applied_id = 0
        self._next_id = 1
        self._size_bytes = 0
        self._load()

    @property
    def pending(self) -> list[JournalEntry]:
        """Entries not yet applied, oldest first (a copy)."""
        return list(self._pending)

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    def _load(self) -> None:
        if self._applied_path.exists():
            self._applied_id = int(self._applied_path.read_text().strip() or 0)
        if not self.path.exists():
            self._next_id = self._applied_id + 1
            return
        data = self.path.read_bytes()
        good_bytes = 0
        previous_id = 0
        for line in data.splitlines(keepends=True):
            entry = JournalEntry.decode(line)
            if entry is None or entry.entry_id <= previous_id:  # ids only grow
                break
            good_bytes += len(line)
            previous_id = entry.entry_id
            if entry.entry_id > self._applied_id:
                self._pending.append(entry)
        if good_bytes < len(data):
            # A write cut short by a crash: never fsynced, so never acknowledged.
            log.warning(
                "webhook journal: dropped a torn tail (written, never acknowledged)",
                path=str(self.path),
                bytes_dropped=len(data) - good_bytes,
            )
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)
                os.fsync(handle.fileno())
        self._size_bytes = good_bytes
        self._next_id = max(self._applied_id, previous_id) + 1
        if self._pending:
            log.warning(
                "webhook journal holds callbacks not yet in the database; applying them first",
                entries=len(self._pending),
                oldest_received_at=self._pending[0].received_at.isoformat(),
            )

    async def append(
        self, route: str, params: list[tuple[str, str]], received_at: dt.datetime
    ) -> JournalEntry:
        """Write the callback and fsync it; once this returns it survives a crash. Raises
        JournalFull when the journal is at its size bound."""
        if route not in ROUTES:
            raise JournalMisused(f"{route!r} callbacks are not journaled")
        # shielded: a cancelled caller must not leave a written entry out of the bookkeeping
        return await asyncio.shield(self._append(route, params, received_at))

    async def _append(
        self, route: str, params: list[tuple[str, str]], received_at: dt.datetime
    ) -> JournalEntry:
        async with self._lock:
            entry = JournalEntry(self._next_id, route, received_at, params)
            line = entry.encode()
            if self._size_bytes + len(line) > self.bytes_max:
                raise JournalFull(
                    f"the webhook journal holds {self._size_bytes} bytes "
                    f"(webhook_journal_bytes_max {self.bytes_max})"
                )
            await asyncio.to_thread(self._write, line)
            self._next_id += 1
            self._size_bytes += len(line)
            self._pending.append(entry)
            return entry

    def _write(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def mark_applied(self, entries: Sequence[JournalEntry]) -> None:
        """`entries` (the oldest pending ones, in order: a replayed batch) are in the database
        now. One atomic write of the last one's id records them all; when none is left, the log
        is emptied."""
        await asyncio.shield(self._mark_applied(list(entries)))

    async def _mark_applied(self, entries: list[JournalEntry]) -> None:
        async with self._lock:
            if not entries:
                return
            if self._pending[: len(entries)] != entries:
                raise JournalMisused("journal entries are applied in the order they were written")
            await asyncio.to_thread(self._write_applied, entries[-1].entry_id)
            self._applied_id = entries[-1].entry_id
            del self._pending[: len(entries)]
            if not self._pending:
                await asyncio.to_thread(self._truncate)
                self._size_bytes = 0

    def _write_applied(self, entry_id: int) -> None:
        write_atomically(self._applied_path, f"{entry_id}\n".encode())

    def _truncate(self) -> None:
        with self.path.open("r+b") as handle:
            handle.truncate(0)
            os.fsync(handle.fileno())
