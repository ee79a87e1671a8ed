"""The nightly usage for finance (billing-rules.md, Nightly usage; issue 6).

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
  sees the same ledger) aggregates the day's postings in the database: per account (a few rows
  per account) and per call, the latter streamed through a server-side cursor in call-sid order
  (byte order, so SQLite and PostgreSQL agree) and written out call by call; settled calls'
  timelines are loaded `CALLS_PER_BATCH` at a time. Memory holds one batch of calls and one
  total per account, whatever the day's volume; balances come from `ledger_books` less what was
  posted since, so nothing before the day is re-read.
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
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
CALLS_PER_BATCH = 500  # settled calls whose timelines are loaded by one query
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


def _group_of(row: Any) -> core.PostingGroup:
    return core.PostingGroup(
        kind=row.kind,
        reversed_kind=row.reversed_kind,
        waiver_memo=bool(row.waiver_memo),
        book=row.book,
        unit=row.unit,
        amount=int(row.amount),
        positive=int(row.positive),
        postings=int(row.postings),
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
                known = await self._accounts(connection)
                usages = await self._account_usages(connection, start, end, known)
                by_account = await self._write_calls(
                    connection, day, start, end, known, built, heartbeat
                )
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

    async def _account_usages(
        self,
        connection: AsyncConnection,
        start: dt.datetime,
        end: dt.datetime,
        known: dict[str, tuple[str, dt.datetime]],
    ) -> dict[str, core.AccountUsage]:
        """Every account existing by the day's end, with its balances and the day's movements
        (aggregated in the database: a few rows per account)."""
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

        t, p, b = ledger_transactions, ledger_postings, ledger_books
        since = (
            select(
                p.c.book.label("book"),
                func.sum(p.c.amount).label("since_start"),
                func.sum(case((t.c.posted_at >= end, p.c.amount), else_=_constant("0"))).label(
                    "since_end"
                ),
            )
            .select_from(p.join(t, t.c.transaction_id == p.c.transaction_id))
            .where(t.c.posted_at >= start)
            .group_by(p.c.book)
            .subquery()
        )
        balances = await connection.execute(
            select(
                b.c.account_id,
                b.c.kind,
                b.c.balance,
                func.coalesce(since.c.since_start, 0).label("since_start"),
                func.coalesce(since.c.since_end, 0).label("since_end"),
            )
            .select_from(b.outerjoin(since, since.c.book == b.c.book))
            .where(b.c.account_id.is_not(None))
        )
        for row in balances:
            balance = int(row.balance)
            opening = balance - int(row.since_start)
            closing = balance - int(row.since_end)
            if row.account_id not in usages and opening == closing == 0:
                continue  # an account opened after the day
            usage_of(row.account_id).balances[row.kind] = core.BookBalance(opening, closing)

        groups = await connection.execute(
            _grouped_postings(start, end, [t.c.account_id.label("account_id")]).where(
                t.c.account_id.is_not(None)
            )
        )
        for row in groups:
            usage_of(row.account_id).movements.add(_group_of(row), row.account_id)
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
    ) -> dict[str, _AccountCalls]:
        """Stream the day's calls in call-sid order and write their rows; return per account
        what the rows add up to."""
        t = ledger_transactions
        charges = _grouped_postings(
            start, end, [t.c.call_sid.label("call_sid"), t.c.account_id.label("tx_account_id")]
        ).where(t.c.call_sid.is_not(None))
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
        query = (
            select(
                rows,
                calls.c.account_id.label("call_account_id"),
                calls.c.plan,
                calls.c.started_at,
                calls.c.ended_at,
                calls.c.settled_at,
                calls.c.waived_at,
                calls.c.waiver_reason,
                calls.c.closed_by_sweeper,
            )
            .select_from(rows.outerjoin(calls, calls.c.call_sid == rows.c.call_sid))
            .order_by(order)
            .execution_options(yield_per=STREAM_ROWS)
        )
        calls_file = built.files[UsageFile.CALLS_CSV]
        calls_file.write(core.call_csv_header())
        line = core.new_csv_line()
        by_account: dict[str, _AccountCalls] = {}
        batch: list[_CallRows] = []
        last_beat = self._clock()

        async def flush() -> None:
            nonlocal last_beat
            times = await self._time_facts(
                connection,
                [c for c in batch if c.settled_at is not None and start <= c.settled_at < end],
            )
            for call in batch:
                row = self._call_usage(call, start, end, known, times.get(call.call_sid))
                calls_file.write(core.call_csv_line(day, row, line))
                built.calls_rows += 1
                facts = by_account.setdefault(row.account_id, _AccountCalls())
                facts.movements.merge(row.movements)
                if row.status is core.RowStatus.SETTLED and row.time is not None:
                    facts.calls += 1
                    facts.hold_seconds += row.time.hold_seconds
                    facts.research_seconds += row.time.research_seconds
                if call.waived_at is not None and start <= call.waived_at < end:
                    facts.waivers += 1
            batch.clear()
            if heartbeat is not None and self._clock() - last_beat >= dt.timedelta(
                seconds=HEARTBEAT_SECONDS
            ):
                await heartbeat()
                last_beat = self._clock()

        result = await connection.stream(query)
        current: _CallRows | None = None
        async for partition in result.partitions():
            for row in partition:
                if current is None or row.call_sid != current.call_sid:
                    if current is not None:
                        batch.append(current)
                        if len(batch) >= CALLS_PER_BATCH:
                            await flush()
                    current = _CallRows(
                        call_sid=row.call_sid,
                        account_id=row.call_account_id or row.tx_account_id,
                        plan=row.plan,
                        started_at=row.started_at,
                        ended_at=row.ended_at,
                        settled_at=row.settled_at,
                        waived_at=row.waived_at,
                        waiver_reason=row.waiver_reason,
                        closed_by_sweeper=bool(row.closed_by_sweeper),
                    )
                if row.kind is not None:
                    current.movements.add(_group_of(row), row.tx_account_id)
        if current is not None:
            batch.append(current)
        if batch:
            await flush()
        return by_account

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
        (`calls_store.load_timeline`, for a batch of calls at once)."""
        by_sid = {call.call_sid: call for call in settled}
        if not by_sid:
            return {}
        events: dict[str, list[ConferenceEvent]] = {sid: [] for sid in by_sid}
        leg_end: dict[str, dt.datetime] = {}
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
                w.c.call_sid.in_(list(by_sid)),
                w.c.route.in_(("conference", "call-status")),
                w.c.received_at <= calls.c.settled_at,
            )
        )
        for row in rows:
            if row.event_at is None:
                continue
            if row.route == "conference":
                events[row.call_sid].append(
                    ConferenceEvent(
                        sequence_number=row.sequence_number,
                        at_seconds=int(row.event_at.timestamp()),
                        kind=row.kind,
                        call_sid=row.participant_sid or "",
                        label=row.label or "",
                        hold=row.hold,
                    )
                )
            elif row.kind in TERMINAL_CALL_STATUSES:
                leg_end[row.call_sid] = min(leg_end.get(row.call_sid, row.event_at), row.event_at)
        marks: dict[str, list[ResearchMark]] = {sid: [] for sid in by_sid}
        for mark in await connection.execute(
            select(
                research_marks.c.call_sid,
                research_marks.c.agent_id,
                research_marks.c.start_at,
                research_marks.c.end_at,
            )
            .where(research_marks.c.call_sid.in_(list(by_sid)))
            .order_by(research_marks.c.mark_id)
        ):
            marks[mark.call_sid].append(
                ResearchMark(
                    mark.agent_id,
                    int(mark.start_at.timestamp()),
                    None if mark.end_at is None else int(mark.end_at.timestamp()),
                )
            )
        facts: dict[str, core.TimeFacts] = {}
        increment = self._settings.increment_seconds
        for sid, call in by_sid.items():
            assert call.settled_at is not None
            ended = leg_end.get(sid)
            if call.closed_by_sweeper and call.ended_at is not None:
                ended = call.ended_at if ended is None else min(ended, call.ended_at)
            timeline = build_timeline(
                events[sid],
                marks[sid],
                now_seconds=int(call.settled_at.timestamp()),
                research_max_seconds=self._settings.research_max_minutes * 60,
                call_ended_at_seconds=None if ended is None else int(ended.timestamp()),
                customer_call_sid=sid,
            )
            agents = timeline.agents.values()
            facts[sid] = core.TimeFacts(
                agents=tuple(sorted(timeline.agents)),
                hold_seconds=timeline.hold_seconds,
                active_seconds=sum(a.active_seconds for a in agents),
                research_seconds=sum(a.research_seconds for a in agents),
                billable_seconds=sum(a.billable_seconds for a in agents),
                agent_minutes=sum(agent_minutes(a.billable_seconds, increment) for a in agents),
            )
        return facts


def _breaches(report: CheckReport) -> str:
    shown = "; ".join(
        f"[{breach.invariant}] {breach.detail}"
        for breach in report.breaches[:BREACHES_IN_DETAIL_MAX]
    )
    more = len(report.breaches) - BREACHES_IN_DETAIL_MAX
    return shown + (f"; and {more} more (meterd ledger check lists them)" if more > 0 else "")
