"""The nightly usage for finance (docs/billing.md, Nightly usage; issue 6).

A closed business day's report is built from the database, checked, written atomically under
`<state_dir>/usage/` and recorded once in `usage_runs`:

    <day>.csv         one row per account        GET /finance/usage/<day>.csv
    <day>.json        the same, with totals      GET /finance/usage/<day>.json
    <day>.calls.csv   one row per call and day   GET /finance/usage/<day>/calls.csv

What the rows count, and the reconciliation, are decided in `meterd.core.usage` (its docstring).
Decisions here:

- **Closed.** A day is reported once it ended `CLOSE_MARGIN_SECONDS` ago, so that a write
  transaction stamped just before midnight has committed. `usage_cron` (default 00:30) must fall
  after that margin; a run before it finds yesterday not closed and leaves it to the next run.
- **Once.** A run claims its day in `usage_runs` (`INSERT ... ON CONFLICT DO NOTHING`) before
  building; a second daemon, or a second job in this one, finds the claim and moves on. A
  claim is renewed while the build runs and may be taken over once it is `LEASE_SECONDS` old (its
  builder died), as may a refused or failed day. The nightly job and the job at start both run
  `catch_up`: every closed day without a published report, from the earliest posting or run (at
  most `CATCH_UP_DAYS_MAX` days back; older days: `meterd usage --date`), oldest first. So a
  restart or missed nights are caught up, and two daemons produce each day once.
- **Checked.** Before building, the whole ledger passes `meterd ledger check`'s invariants
  (reused: `check_ledger`); a breach refuses the report, records why, logs a critical alert and
  raises `LedgerBroken`, an `InvariantBroken`, which stops the daemon like any broken money
  invariant. Then every account reconciles (opening + movements = closing per book) and the calls
  file adds up to the accounts file; if not, the day is refused (recorded, alerted, retried next
  run) and nothing is published.
- **Streaming.** One read transaction (on PostgreSQL `REPEATABLE READ, READ ONLY`, so every query
  sees the same ledger) reads the day's postings once, summed in the database per call, account,
  kind and book, through a server-side cursor in call-sid order (byte order, so SQLite and
  PostgreSQL agree). That one pass writes the calls file call by call and adds up, per account
  and per book, the accounts' movements and balances. The calls' own columns and the settled
  calls' events and research marks (their timelines) are loaded `CALLS_PER_BATCH` calls at a
  time, one query each. Memory holds one batch of calls and a few totals per account and book,
  whatever the day's volume; balances come from `ledger_books` less what was posted since the
  day's end and during the day, so nothing before the day is re-read.
- **Atomic, reproducible files.** Each file is written to a temporary file in the same
  directory, fsynced, renamed into place, and the directory fsynced, before the run is recorded
  as published with the files' SHA-256. A file depends only on the database (never on when or
  where it was built), and a settled call's time comes from the events recorded up to its
  settlement, so any daemon can rebuild a day: when a file is missing here (another daemon built
  it) or damaged, it is rebuilt and must hash to what was published (`UsageMismatch` if not).
  `business_timezone`, `increment_seconds` and `research_max_minutes` shape the report: changing
  them changes what a rebuild of an earlier day gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Row,
    and_,
    case,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from meterd.clock import Clock
from meterd.config import Settings
from meterd.core import usage as core
from meterd.core.timeline import ConferenceEvent, ResearchMark, agent_minutes, build_timeline
from meterd.logs import get_logger
from meterd.services.errors import InvariantBroken
from meterd.services.ledger_check import CheckReport, check_ledger
from meterd.store.calls_store import CallStatus
from meterd.store.database import Database
from meterd.store.schema import (
    accounts,
    calls,
    ledger_books,
    ledger_postings,
    ledger_transactions,
    research_marks,
    webhook_events,
)
from meterd.store.sql import insert_ignoring_conflict
from meterd.store.usage_schema import usage_runs

log = get_logger("meterd.usage")

CLOSE_MARGIN_SECONDS = 120
CATCH_UP_DAYS_MAX = 62
LEASE_SECONDS = 600  # a claim older than this, not renewed, belongs to a builder that died
HEARTBEAT_SECONDS = 60  # how often a build renews its claim
STREAM_ROWS = 5000  # rows fetched from the server-side cursor at a time
CALLS_PER_BATCH = 2000  # calls whose columns, events and marks are loaded by one query each
BREACHES_IN_DETAIL_MAX = 10
# A customer leg's end, as `calls_store.customer_leg_end` reads it.
TERMINAL_CALL_STATUSES = ("completed", "busy", "failed", "no-answer", "canceled")


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


class RunStatus(StrEnum):
    BUILDING = "building"
    PUBLISHED = "published"
    REFUSED = "refused"
    FAILED = "failed"


class UsageNotReady(Exception):
    """The day is not closed, is in the future, or its usage has not been built yet."""


class UsageRefused(Exception):
    """The day's usage was not published; the message says why."""


class LedgerBroken(UsageRefused, InvariantBroken):
    """The ledger fails an invariant of `meterd ledger check`: nothing is published, and the
    daemon stops (an `InvariantBroken`)."""


class UsageMismatch(Exception):
    """Rebuilding a published day gives other bytes than were published."""


@dataclass(frozen=True)
class UsageSettings:
    state_dir: Path
    business_timezone: str
    increment_seconds: int
    research_max_minutes: int

    @classmethod
    def of(cls, settings: Settings) -> UsageSettings:
        return cls(
            state_dir=settings.state_dir,
            business_timezone=settings.business_timezone,
            increment_seconds=settings.increment_seconds,
            research_max_minutes=settings.research_max_minutes,
        )


# --- files ---------------------------------------------------------------------------------------


class _TempFile:
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
class _Built:
    day: dt.date
    files: dict[UsageFile, _TempFile] = field(default_factory=dict)
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
        for temporary in self.files.values():
            os.replace(temporary.path, temporary.final)
        directory = next(iter(self.files.values())).final.parent
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _remove_stale_temporaries(directory: Path, day: dt.date) -> None:
    """Temporary files of the day left by a build that died (older than any live build's)."""
    older_than = time.time() - LEASE_SECONDS
    for path in directory.glob(f".{day.isoformat()}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < older_than:
                path.unlink()


@contextlib.contextmanager
def _gc_passes_over_new_objects_only() -> Iterator[None]:
    """While a day is built, the cyclic garbage collector leaves out the objects that existed
    before (the daemon's modules, caches, app: 100,000 objects and more, about 70 ms a full pass
    on a small machine). A build keeps batches of calls alive, which sets off a full pass every
    two or three thousand calls, about a second in all over a million entries.

    `gc.unfreeze` hands every object back at the end, so nothing escapes collection for longer
    than the build; if two builds overlap, the first to end hands everything back (the other is
    only slower). Objects are still freed as soon as nothing refers to them."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _sha256_of(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return None


# --- the per-call stream -------------------------------------------------------------------------


@dataclass
class _CallRows:
    """One call's rows of the stream: its `calls` columns and its postings of the day."""

    call_sid: str
    account_id: str | None
    plan: str | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    settled_at: dt.datetime | None
    waived_at: dt.datetime | None
    waiver_reason: str | None
    closed_by_sweeper: bool
    movements: core.Movements = field(default_factory=core.Movements)


@dataclass
class _AccountCalls:
    """What the calls file says about one account, to fill and tie its row."""

    calls: int = 0
    hold_seconds: int = 0
    research_seconds: int = 0
    waivers: int = 0
    movements: core.Movements = field(default_factory=core.Movements)


@dataclass
class _Stream:
    """What one pass over the day's postings adds up, besides the calls file."""

    by_account: dict[str, _AccountCalls] = field(default_factory=dict)
    # (account, kind, reversed kind, waiver, book, unit) -> [amount, positive, postings]
    account_groups: dict[tuple[str, str, str | None, bool, str, str], list[int]] = field(
        default_factory=dict
    )
    day_by_book: dict[str, int] = field(default_factory=dict)  # the day's net per book
    call_error: core.UsageDoesNotReconcile | None = None  # the first call that does not add up


def _constant(sql: str) -> Any:
    # Constants inlined, never bound: a grouped expression must render the same in SELECT and
    # GROUP BY, which bound parameters ($1 vs $5) would not on PostgreSQL.
    return literal_column(sql)


def _waiver_memo() -> Any:
    t = ledger_transactions
    return case(
        (
            and_(
                t.c.kind == _constant(f"'{core.REVERSAL}'"),
                t.c.memo == _constant(f"'{core.WAIVER_MEMO}'"),
            ),
            _constant("1"),
        ),
        else_=_constant("0"),
    )


def _grouped_postings(start: dt.datetime, end: dt.datetime, by: Sequence[Any]) -> Any:
    """The day's postings summed per (`by`..., kind, reversed kind, waiver, book, unit)."""
    t, p = ledger_transactions, ledger_postings
    reversed_ = ledger_transactions.alias("reversed")
    waiver_memo = _waiver_memo()
    return (
        select(
            *by,
            t.c.kind.label("kind"),
            reversed_.c.kind.label("reversed_kind"),
            waiver_memo.label("waiver_memo"),
            p.c.book.label("book"),
            p.c.unit.label("unit"),
            func.sum(p.c.amount).label("amount"),
            func.sum(case((p.c.amount > _constant("0"), p.c.amount), else_=_constant("0"))).label(
                "positive"
            ),
            func.count().label("postings"),
        )
        .select_from(
            t.join(p, p.c.transaction_id == t.c.transaction_id).outerjoin(
                reversed_, reversed_.c.idempotency_key == t.c.reverses_key
            )
        )
        .where(t.c.posted_at >= start, t.c.posted_at < end)
        .group_by(*by, t.c.kind, reversed_.c.kind, waiver_memo, p.c.book, p.c.unit)
    )


def _call_rows(
    call_sid: str, tx_account_id: str | None, movements: core.Movements, call: Any
) -> _CallRows:
    """A call of the stream with its `calls` columns (none if the call is not recorded)."""
    if call is None:
        return _CallRows(
            call_sid=call_sid,
            account_id=tx_account_id,
            plan=None,
            started_at=None,
            ended_at=None,
            settled_at=None,
            waived_at=None,
            waiver_reason=None,
            closed_by_sweeper=False,
            movements=movements,
        )
    return _CallRows(
        call_sid=call_sid,
        account_id=call.account_id or tx_account_id,
        plan=call.plan,
        started_at=call.started_at,
        ended_at=call.ended_at,
        settled_at=call.settled_at,
        waived_at=call.waived_at,
        waiver_reason=call.waiver_reason,
        closed_by_sweeper=bool(call.closed_by_sweeper),
        movements=movements,
    )


class UsageService:
    def __init__(
        self,
        database: Database,
        settings: UsageSettings,
        clock: Clock,
        *,
        instance: str | None = None,
    ) -> None:
        self._database = database
        self._settings = settings
        self._clock = clock
        self._instance = instance or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.directory = settings.state_dir / "usage"

    @classmethod
    def from_settings(cls, database: Database, settings: Settings, clock: Clock) -> UsageService:
        return cls(database, UsageSettings.of(settings), clock)

    @property
    def timezone(self) -> str:
        return self._settings.business_timezone

    def path(self, day: dt.date, kind: UsageFile) -> Path:
        return self.directory / kind.file_name(day)

    def last_closed_day(self) -> dt.date:
        return core.last_closed_day(self._clock(), self.timezone, CLOSE_MARGIN_SECONDS)

    def require_closed(self, day: dt.date) -> None:
        now = self._clock()
        today = core.business_day_of(now, self.timezone)
        if day > today:
            raise UsageNotReady(
                f"{day} is in the future (it is {today} in {self.timezone}); usage exists only "
                f"for business days that have closed"
            )
        if day > self.last_closed_day():
            _, end = core.day_bounds(day, self.timezone)
            raise UsageNotReady(
                f"the business day {day} ({self.timezone}) has not closed yet: it ends at "
                f"{core.iso_utc(end)}, and its usage is built after that, at usage_cron"
            )

    # --- the jobs -------------------------------------------------------------------------------

    async def catch_up(self) -> list[dt.date]:
        """Build every closed day that has no published usage yet (the nightly job, and the job
        at start). Returns the days this service built and published."""
        days = await self._missing_days(self.last_closed_day())
        if not days:
            return []
        await self._check_ledger_or_refuse(days)
        built: list[dt.date] = []
        for day in days:
            if not await self._claim(day):
                log.info("usage being built elsewhere or already published", business_day=str(day))
                continue
            try:
                await self._build_and_publish(day)
            except UsageRefused:
                continue  # recorded and alerted; the next run tries again
            built.append(day)
        return built

    async def build(self, day: dt.date, *, regenerate: bool = False) -> None:
        """`meterd usage`: make sure the day's files are here and published; with `regenerate`,
        build them again from the ledger and prove them identical to what was published."""
        self.require_closed(day)
        run = await self._run(day)
        if run is not None and run.status == RunStatus.PUBLISHED:
            if regenerate:
                await self._rebuild_published(day, run)
            else:
                await self._ensure_files(day, run)
            return
        await self._check_ledger_or_refuse([day])
        if not await self._claim(day):
            raise UsageNotReady(f"another meterd is building the usage of {day}; try again shortly")
        await self._build_and_publish(day)

    async def published_file(self, day: dt.date, kind: UsageFile) -> Path:
        """The published file of a day, here (rebuilt and proven identical if it is missing)."""
        self.require_closed(day)
        run = await self._run(day)
        if run is None or run.status in (RunStatus.BUILDING, RunStatus.FAILED):
            raise UsageNotReady(
                f"the usage of {day} has not been built yet: the nightly job builds it at "
                f"usage_cron (or now: meterd usage --date {day})"
            )
        if run.status == RunStatus.REFUSED:
            raise UsageRefused(f"the usage of {day} was refused: {run.detail}")
        await self._ensure_files(day, run, only=kind)
        return self.path(day, kind)

    # --- runs -----------------------------------------------------------------------------------

    async def _run(self, day: dt.date) -> Row[Any] | None:
        async with self._database.read() as connection:
            return (
                await connection.execute(select(usage_runs).where(usage_runs.c.business_day == day))
            ).one_or_none()

    async def _missing_days(self, last: dt.date) -> list[dt.date]:
        async with self._database.read() as connection:
            earliest_run = await connection.scalar(select(func.min(usage_runs.c.business_day)))
            earliest_posting = await connection.scalar(
                select(func.min(ledger_transactions.c.posted_at))
            )
            anchors = [earliest_run] if earliest_run is not None else []
            if earliest_posting is not None:
                anchors.append(core.business_day_of(earliest_posting, self.timezone))
            first = min(anchors) if anchors else last
            window_start = last - dt.timedelta(days=CATCH_UP_DAYS_MAX - 1)
            if first < window_start:
                log.warning(
                    "usage older than the catch-up window is not built by itself; build it "
                    "with meterd usage --date",
                    from_day=str(first),
                    window_start=str(window_start),
                )
                first = window_start
            if first > last:
                return []
            published = set(
                (
                    await connection.scalars(
                        select(usage_runs.c.business_day).where(
                            usage_runs.c.business_day.between(first, last),
                            usage_runs.c.status == RunStatus.PUBLISHED.value,
                        )
                    )
                ).all()
            )
        count = (last - first).days + 1
        days = (first + dt.timedelta(days=n) for n in range(count))
        return [day for day in days if day not in published]

    async def _claim(self, day: dt.date) -> bool:
        """Take the day for this service: True if it is ours to build now."""
        now = self._clock()
        async with self._database.write() as connection:
            inserted = await connection.scalar(
                insert_ignoring_conflict(
                    connection,
                    usage_runs,
                    {
                        "business_day": day,
                        "status": RunStatus.BUILDING.value,
                        "claimed_by": self._instance,
                        "claimed_at": now,
                        "created_at": now,
                    },
                    ["business_day"],
                ).returning(usage_runs.c.business_day)
            )
            if inserted is not None:
                return True
            query = select(usage_runs).where(usage_runs.c.business_day == day)
            if connection.dialect.name == "postgresql":
                query = query.with_for_update()
            run = (await connection.execute(query)).one()
            if run.status == RunStatus.PUBLISHED:
                return False
            fresh = run.claimed_at > now - dt.timedelta(seconds=LEASE_SECONDS)
            if run.status == RunStatus.BUILDING and fresh:
                return False  # another daemon (or another job of ours) is building it
            if run.status == RunStatus.BUILDING:
                log.warning(
                    "taking over a usage build whose builder stopped renewing its claim",
                    business_day=str(day),
                    claimed_by=run.claimed_by,
                )
            await connection.execute(
                update(usage_runs)
                .where(usage_runs.c.business_day == day)
                .values(
                    status=RunStatus.BUILDING.value,
                    claimed_by=self._instance,
                    claimed_at=now,
                    detail=None,
                )
            )
            return True

    async def _renew(self, day: dt.date) -> None:
        async with self._database.write() as connection:
            renewed = await connection.execute(
                update(usage_runs)
                .where(
                    usage_runs.c.business_day == day,
                    usage_runs.c.claimed_by == self._instance,
                    usage_runs.c.status == RunStatus.BUILDING.value,
                )
                .values(claimed_at=self._clock())
            )
        if renewed.rowcount != 1:
            log.warning("lost the claim on a usage build", business_day=str(day))

    async def _finish(
        self,
        day: dt.date,
        status: RunStatus,
        *,
        sha256: dict[UsageFile, str] | None = None,
        detail: str | None = None,
    ) -> bool:
        values: dict[str, Any] = {"status": status.value, "detail": detail}
        if sha256 is not None:
            values.update({kind.sha_column: digest for kind, digest in sha256.items()})
            values["published_at"] = self._clock()
        async with self._database.write() as connection:
            finished = await connection.execute(
                update(usage_runs)
                .where(
                    usage_runs.c.business_day == day,
                    usage_runs.c.claimed_by == self._instance,
                    usage_runs.c.status == RunStatus.BUILDING.value,
                )
                .values(**values)
            )
        if finished.rowcount != 1:
            log.warning(
                "another daemon took over this usage build; its result stands",
                business_day=str(day),
            )
            return False
        return True

    async def _check_ledger_or_refuse(self, days: Sequence[dt.date]) -> None:
        report = await check_ledger(self._database)
        if report.ok:
            return
        detail = "the ledger fails its invariants: " + _breaches(report)
        for day in days:
            if await self._claim(day):
                await self._finish(day, RunStatus.REFUSED, detail=detail)
        log.critical(
            "usage NOT published",
            business_days=[str(day) for day in days],
            reason=detail,
        )
        raise LedgerBroken(
            f"usage of {', '.join(str(day) for day in days)} not published: {detail}"
        )

    async def _build_and_publish(self, day: dt.date) -> None:
        """Build the claimed day, publish it, record it; refuse (recorded, alerted) if it does
        not reconcile."""
        try:
            built = await self._build(day, heartbeat=lambda: self._renew(day))
        except core.UsageDoesNotReconcile as error:
            detail = f"the report does not reconcile: {error}"
            await self._finish(day, RunStatus.REFUSED, detail=detail)
            log.critical("usage NOT published", business_day=str(day), reason=detail)
            raise UsageRefused(f"usage of {day} not published: {detail}") from error
        except BaseException as error:
            await asyncio.shield(self._finish(day, RunStatus.FAILED, detail=repr(error)[:2000]))
            raise
        try:
            await asyncio.to_thread(built.commit)
        except BaseException:
            built.discard()
            await asyncio.shield(self._finish(day, RunStatus.FAILED, detail="writing the files"))
            raise
        if await self._finish(day, RunStatus.PUBLISHED, sha256=built.sha256):
            log.info(
                "usage published",
                business_day=str(day),
                accounts=built.accounts,
                call_rows=built.calls_rows,
                directory=str(self.directory),
            )

    async def _ensure_files(
        self, day: dt.date, run: Row[Any], only: UsageFile | None = None
    ) -> None:
        kinds = [only] if only is not None else list(UsageFile)
        for kind in kinds:
            digest = await asyncio.to_thread(_sha256_of, self.path(day, kind))
            if digest != getattr(run, kind.sha_column):
                if digest is not None:
                    log.warning(
                        "a usage file differs from what was published; rebuilding it",
                        business_day=str(day),
                        file=kind.file_name(day),
                    )
                await self._rebuild_published(day, run)
                return

    async def _rebuild_published(self, day: dt.date, run: Row[Any]) -> None:
        """Build a published day again; its files must be the published bytes."""
        report = await check_ledger(self._database)
        if not report.ok:
            detail = "the ledger fails its invariants: " + _breaches(report)
            log.critical("usage cannot be rebuilt", business_day=str(day), reason=detail)
            raise LedgerBroken(f"usage of {day} cannot be rebuilt: {detail}")
        try:
            built = await self._build(day, heartbeat=None)
        except core.UsageDoesNotReconcile as error:
            log.critical("usage cannot be rebuilt", business_day=str(day), reason=str(error))
            raise UsageRefused(f"usage of {day} cannot be rebuilt: {error}") from error
        differs = [
            kind.file_name(day)
            for kind, digest in built.sha256.items()
            if digest != getattr(run, kind.sha_column)
        ]
        if differs:
            built.discard()
            log.critical(
                "usage rebuilds differently from what was published",
                business_day=str(day),
                files=differs,
            )
            raise UsageMismatch(
                f"the usage of {day} rebuilds differently from what was published "
                f"({', '.join(differs)}): the data it came from changed after it was published"
            )
        try:
            await asyncio.to_thread(built.commit)
        except BaseException:
            built.discard()
            raise

    # --- the build ------------------------------------------------------------------------------

    async def _build(
        self, day: dt.date, *, heartbeat: Callable[[], Awaitable[None]] | None
    ) -> _Built:
        """Write the day's three files to temporary files; raise `UsageDoesNotReconcile` (and
        keep nothing) unless every account reconciles and the calls tie to the accounts."""
        with _gc_passes_over_new_objects_only():
            return await self._build_files(day, heartbeat=heartbeat)

    async def _build_files(
        self, day: dt.date, *, heartbeat: Callable[[], Awaitable[None]] | None
    ) -> _Built:
        start, end = core.day_bounds(day, self.timezone)
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True, mode=0o700)
        await asyncio.to_thread(_remove_stale_temporaries, self.directory, day)
        built = _Built(day)
        try:
            for kind in UsageFile:
                built.files[kind] = _TempFile(self.directory, kind.file_name(day))
            async with self._database.read() as connection:
                if connection.dialect.name == "postgresql":
                    await connection.execute(
                        text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    )
                    # The day's aggregate is estimated big enough to be JIT-compiled, which
                    # costs more than it saves (about 1 s); for this transaction only.
                    await connection.execute(text("SET LOCAL jit = off"))
                known = await self._accounts(connection)
                balances = await self._balances(connection, end)
                stream = await self._write_calls(
                    connection, day, start, end, known, built, heartbeat
                )
            usages = self._account_usages(end, known, balances, stream)
            if stream.call_error is not None:
                raise stream.call_error
            by_account = stream.by_account
            for account_id, facts in by_account.items():
                usage = usages.get(account_id)
                if usage is None:
                    raise core.UsageDoesNotReconcile(
                        f"calls of account {account_id} have entries but the account has none"
                    )
                usage.calls = facts.calls
                usage.hold_seconds = facts.hold_seconds
                usage.research_seconds = facts.research_seconds
                usage.waivers = facts.waivers
            for account_id in sorted(usages):
                core.reconcile(usages[account_id])
                core.tie_calls(
                    usages[account_id],
                    by_account.get(account_id, _AccountCalls()).movements,
                )
            calls_file = built.files[UsageFile.CALLS_CSV]
            await asyncio.to_thread(calls_file.close_synced)
            ordered = list(usages.values())
            accounts_csv = built.files[UsageFile.ACCOUNTS_CSV]
            accounts_csv.write(core.render_accounts_csv(day, ordered))
            accounts_json = built.files[UsageFile.ACCOUNTS_JSON]
            accounts_json.write(
                core.render_accounts_json(
                    day,
                    self.timezone,
                    ordered,
                    calls_rows=built.calls_rows,
                    calls_sha256=calls_file.sha256,
                )
            )
            await asyncio.to_thread(accounts_csv.close_synced)
            await asyncio.to_thread(accounts_json.close_synced)
            built.accounts = len(ordered)
        except BaseException:
            built.discard()
            raise
        return built

    async def _accounts(self, connection: AsyncConnection) -> dict[str, tuple[str, dt.datetime]]:
        rows = await connection.execute(
            select(accounts.c.account_id, accounts.c.currency, accounts.c.created_at)
        )
        return {row.account_id: (row.currency, row.created_at) for row in rows}

    async def _balances(
        self, connection: AsyncConnection, end: dt.datetime
    ) -> list[tuple[str, str, str, int, int]]:
        """Every customer book: (account, kind, book, balance now, what was posted to it since the
        day's end). Less the day's own postings (summed by the stream), the balance at the day's
        start; so nothing before the day is re-read."""
        t, p, b = ledger_transactions, ledger_postings, ledger_books
        since = (
            select(p.c.book.label("book"), func.sum(p.c.amount).label("since_end"))
            .select_from(p.join(t, t.c.transaction_id == p.c.transaction_id))
            .where(t.c.posted_at >= end)
            .group_by(p.c.book)
            .subquery()
        )
        rows = await connection.execute(
            select(
                b.c.account_id,
                b.c.kind,
                b.c.book,
                b.c.balance,
                func.coalesce(since.c.since_end, 0).label("since_end"),
            )
            .select_from(b.outerjoin(since, since.c.book == b.c.book))
            .where(b.c.account_id.is_not(None))
        )
        return [
            (row.account_id, row.kind, row.book, int(row.balance), int(row.since_end))
            for row in rows
        ]

    def _account_usages(
        self,
        end: dt.datetime,
        known: dict[str, tuple[str, dt.datetime]],
        balances: Iterable[tuple[str, str, str, int, int]],
        stream: _Stream,
    ) -> dict[str, core.AccountUsage]:
        """Every account existing by the day's end, with its balances and the day's movements
        (a few groups per account, summed from the stream of the day's postings)."""
        usages = {
            account_id: core.AccountUsage(account_id, currency)
            for account_id, (currency, created_at) in known.items()
            if created_at < end
        }

        def usage_of(account_id: str) -> core.AccountUsage:
            if account_id not in usages:
                if account_id not in known:
                    raise core.UsageDoesNotReconcile(
                        f"entries of the day name account {account_id!r}, which does not exist"
                    )
                usages[account_id] = core.AccountUsage(account_id, known[account_id][0])
            return usages[account_id]

        for account_id, kind, book, balance, since_end in balances:
            closing = balance - since_end
            opening = closing - stream.day_by_book.get(book, 0)
            if account_id not in usages and opening == closing == 0:
                continue  # an account opened after the day
            usage_of(account_id).balances[kind] = core.BookBalance(opening, closing)
        for (account_id, kind, reversed_kind, waiver_memo, book, unit), (
            amount,
            positive,
            postings,
        ) in stream.account_groups.items():
            group = core.PostingGroup(
                kind, reversed_kind, waiver_memo, book, unit, amount, positive, postings
            )
            usage_of(account_id).movements.add(group, account_id)
        return usages

    async def _write_calls(
        self,
        connection: AsyncConnection,
        day: dt.date,
        start: dt.datetime,
        end: dt.datetime,
        known: dict[str, tuple[str, dt.datetime]],
        built: _Built,
        heartbeat: Callable[[], Awaitable[None]] | None,
    ) -> _Stream:
        """Stream the day's postings, grouped, in call-sid order: write the calls' rows, and sum
        per account (the accounts' movements), per book (their balances) and what the call rows
        add up to per account. One pass over the day's postings does all three."""
        t = ledger_transactions
        charges = _grouped_postings(
            start, end, [t.c.call_sid.label("call_sid"), t.c.account_id.label("tx_account_id")]
        )  # entries without a call too (call_sid NULL): they count for accounts and books
        # calls settled or waived on the day, with or without entries: one row each, no amounts
        markers = select(
            calls.c.call_sid.label("call_sid"),
            calls.c.account_id.label("tx_account_id"),
            null().label("kind"),
            null().label("reversed_kind"),
            _constant("0").label("waiver_memo"),
            null().label("book"),
            null().label("unit"),
            _constant("0").label("amount"),
            _constant("0").label("positive"),
            _constant("0").label("postings"),
        ).where(
            calls.c.account_id.is_not(None),
            or_(
                and_(
                    calls.c.settled_at >= start,
                    calls.c.settled_at < end,
                    calls.c.status == CallStatus.ENDED,
                ),
                and_(calls.c.waived_at >= start, calls.c.waived_at < end),
            ),
        )
        rows = union_all(charges, markers).subquery("day_calls")
        order: Any = rows.c.call_sid
        if connection.dialect.name == "postgresql":
            order = order.collate("C")  # byte order, as SQLite's BINARY and Python's own
        # The calls' own columns are read once per batch of calls (`_calls_of`), not repeated on
        # each of a call's grouped rows.
        query = select(rows).order_by(order).execution_options(yield_per=STREAM_ROWS)
        calls_file = built.files[UsageFile.CALLS_CSV]
        calls_file.write(core.call_csv_header())
        stream = _Stream()
        by_account, account_groups, day_by_book = (
            stream.by_account,
            stream.account_groups,
            stream.day_by_book,
        )
        # calls streamed and not yet written: (call sid, account of its first row, movements)
        pending: list[tuple[str, str | None, core.Movements]] = []
        last_beat = self._clock()

        async def flush(count: int) -> None:
            """Write the first `count` pending calls (all of their rows have been read)."""
            nonlocal last_beat
            if stream.call_error is not None:
                del pending[:count]  # the day is refused; the stream still sums the accounts
                return
            columns = await self._calls_of(connection, [sid for sid, _, _ in pending[:count]])
            batch = [
                _call_rows(sid, account_id, movements, columns.get(sid))
                for sid, account_id, movements in pending[:count]
            ]
            del pending[:count]
            times = await self._time_facts(
                connection,
                [c for c in batch if c.settled_at is not None and start <= c.settled_at < end],
            )

            def usages() -> Iterator[core.CallUsage]:
                for call in batch:
                    row = self._call_usage(call, start, end, known, times.get(call.call_sid))
                    facts = by_account.get(row.account_id)
                    if facts is None:
                        facts = by_account[row.account_id] = _AccountCalls()
                    facts.movements.merge(row.movements)
                    if row.status is core.RowStatus.SETTLED and row.time is not None:
                        facts.calls += 1
                        facts.hold_seconds += row.time.hold_seconds
                        facts.research_seconds += row.time.research_seconds
                    if call.waived_at is not None and start <= call.waived_at < end:
                        facts.waivers += 1
                    yield row

            try:
                lines = core.call_csv_lines(day, usages())
            except core.UsageDoesNotReconcile as error:
                # raised after the accounts' own checks, which come first
                stream.call_error = error
                return
            calls_file.write(lines)
            built.calls_rows += len(batch)
            if heartbeat is not None and self._clock() - last_beat >= dt.timedelta(
                seconds=HEARTBEAT_SECONDS
            ):
                await heartbeat()
                last_beat = self._clock()

        result = await connection.stream(query)
        current: str | None = None
        movements = core.Movements()
        while partition := await result.fetchmany(STREAM_ROWS):
            for (
                call_sid,
                tx_account_id,
                kind,
                reversed_kind,
                waiver_memo,
                book,
                unit,
                amount,
                positive,
                postings,
            ) in partition:
                if call_sid is not None and call_sid != current:
                    current, movements = call_sid, core.Movements()
                    pending.append((call_sid, tx_account_id, movements))
                if kind is None:
                    continue  # a call's marker: no amounts
                amount, positive, postings = int(amount), int(positive), int(postings)
                waiver = bool(waiver_memo)
                day_by_book[book] = day_by_book.get(book, 0) + amount
                if tx_account_id is not None:
                    key = (tx_account_id, kind, reversed_kind, waiver, book, unit)
                    total = account_groups.get(key)
                    if total is None:
                        account_groups[key] = [amount, positive, postings]
                    else:
                        total[0] += amount
                        total[1] += positive
                        total[2] += postings
                if call_sid is not None:
                    movements.add_group(
                        kind,
                        reversed_kind,
                        waiver,
                        book,
                        unit,
                        amount,
                        positive,
                        postings,
                        tx_account_id,
                    )
            # Between partitions, so that the rows read are not kept while the calls are
            # written; the last call read may go on in the next partition.
            del partition
            if len(pending) > CALLS_PER_BATCH:
                await flush(len(pending) - 1)
        if pending:
            await flush(len(pending))
        return stream

    async def _calls_of(
        self, connection: AsyncConnection, call_sids: Sequence[str]
    ) -> dict[str, Any]:
        """The `calls` columns the report reads, for a batch of calls (one query)."""
        rows = await connection.execute(
            select(
                calls.c.call_sid,
                calls.c.account_id,
                calls.c.plan,
                calls.c.started_at,
                calls.c.ended_at,
                calls.c.settled_at,
                calls.c.waived_at,
                calls.c.waiver_reason,
                calls.c.closed_by_sweeper,
            ).where(calls.c.call_sid.in_(call_sids))
        )
        return {row.call_sid: row for row in rows}

    def _call_usage(
        self,
        call: _CallRows,
        start: dt.datetime,
        end: dt.datetime,
        known: dict[str, tuple[str, dt.datetime]],
        time: core.TimeFacts | None,
    ) -> core.CallUsage:
        if call.account_id is None or call.account_id not in known:
            raise core.UsageDoesNotReconcile(
                f"call {call.call_sid} has entries of the day but no known account"
            )
        settled = call.settled_at is not None and call.settled_at < end
        if not settled:
            status = core.RowStatus.OPEN
        elif call.settled_at is not None and call.settled_at >= start:
            status = core.RowStatus.SETTLED
        else:
            status = core.RowStatus.ADJUSTED
        waived = call.waived_at is not None and call.waived_at < end
        return core.CallUsage(
            call_sid=call.call_sid,
            account_id=call.account_id,
            plan=call.plan,
            currency=known[call.account_id][0],
            status=status,
            started_at=call.started_at,
            ended_at=call.ended_at if settled else None,
            settled_at=call.settled_at if settled else None,
            waiver_reason=call.waiver_reason if waived else None,
            time=time if status is core.RowStatus.SETTLED else None,
            movements=call.movements,
        )

    async def _time_facts(
        self, connection: AsyncConnection, settled: Iterable[_CallRows]
    ) -> dict[str, core.TimeFacts]:
        """Each settled call's time, from its timeline exactly as settlement built it: the events
        recorded up to settlement, open intervals counted to `settled_at`
        (`calls_store.load_timeline`, for a batch of calls at once: one query for the marks, one
        for the events, in call order so that each call's timeline is built as soon as its
        events are read)."""
        by_sid = {call.call_sid: call for call in settled}
        if not by_sid:
            return {}
        sids = list(by_sid)
        marks: dict[str, list[ResearchMark]] = {}
        for sid, agent_id, start_at, end_at in await connection.execute(
            select(
                research_marks.c.call_sid,
                research_marks.c.agent_id,
                research_marks.c.start_at,
                research_marks.c.end_at,
            )
            .where(research_marks.c.call_sid.in_(sids))
            .order_by(research_marks.c.mark_id)
        ):
            marks.setdefault(sid, []).append(
                ResearchMark(
                    agent_id,
                    int(start_at.timestamp()),
                    None if end_at is None else int(end_at.timestamp()),
                )
            )
        w = webhook_events
        rows = await connection.execute(
            select(
                w.c.call_sid,
                w.c.route,
                w.c.kind,
                w.c.sequence_number,
                w.c.event_at,
                w.c.participant_sid,
                w.c.label,
                w.c.hold,
            )
            .select_from(w.join(calls, calls.c.call_sid == w.c.call_sid))
            .where(
                w.c.call_sid.in_(sids),
                calls.c.call_sid.in_(sids),  # else PostgreSQL hashes the whole calls table
                or_(
                    w.c.route == "conference",
                    and_(w.c.route == "call-status", w.c.kind.in_(TERMINAL_CALL_STATUSES)),
                ),
                w.c.received_at <= calls.c.settled_at,
            )
            .order_by(w.c.call_sid)  # any order, as long as a call's events come together
        )
        facts: dict[str, core.TimeFacts] = {}
        current: str | None = None
        events: list[ConferenceEvent] = []
        leg_end: dt.datetime | None = None  # the customer's leg ended (terminal call-status)
        for sid, route, kind, sequence_number, event_at, participant, label, hold in rows:
            if sid != current:
                if current is not None:
                    facts[current] = self._time_of(by_sid[current], events, marks, leg_end)
                current, events, leg_end = sid, [], None
            if event_at is None:
                continue
            if route == "conference":
                events.append(
                    ConferenceEvent(
                        sequence_number,
                        int(event_at.timestamp()),
                        kind,
                        participant or "",
                        label or "",
                        hold,
                    )
                )
            elif leg_end is None or event_at < leg_end:
                leg_end = event_at
        if current is not None:
            facts[current] = self._time_of(by_sid[current], events, marks, leg_end)
        for sid, call in by_sid.items():
            if sid not in facts:  # no event recorded by settlement
                facts[sid] = self._time_of(call, [], marks, None)
        return facts

    def _time_of(
        self,
        call: _CallRows,
        events: list[ConferenceEvent],
        marks: dict[str, list[ResearchMark]],
        leg_end: dt.datetime | None,
    ) -> core.TimeFacts:
        """One settled call's time facts (`calls_store.load_timeline`, then summed)."""
        assert call.settled_at is not None
        ended = leg_end
        if call.closed_by_sweeper and call.ended_at is not None:
            ended = call.ended_at if ended is None else min(ended, call.ended_at)
        timeline = build_timeline(
            events,
            marks.get(call.call_sid, []),
            now_seconds=int(call.settled_at.timestamp()),
            research_max_seconds=self._settings.research_max_minutes * 60,
            call_ended_at_seconds=None if ended is None else int(ended.timestamp()),
            customer_call_sid=call.call_sid,
        )
        increment = self._settings.increment_seconds
        active = research = billable = minutes = 0
        for agent in timeline.agents.values():
            seconds = agent.billable_seconds
            active += agent.active_seconds
            research += agent.research_seconds
            billable += seconds
            minutes += agent_minutes(seconds, increment)
        return core.TimeFacts(
            agents=tuple(sorted(timeline.agents)),
            hold_seconds=timeline.hold_seconds,
            active_seconds=active,
            research_seconds=research,
            billable_seconds=billable,
            agent_minutes=minutes,
        )


def _breaches(report: CheckReport) -> str:
    shown = "; ".join(
        f"[{breach.invariant}] {breach.detail}"
        for breach in report.breaches[:BREACHES_IN_DETAIL_MAX]
    )
    more = len(report.breaches) - BREACHES_IN_DETAIL_MAX
    return shown + (f"; and {more} more (meterd ledger check lists them)" if more > 0 else "")
