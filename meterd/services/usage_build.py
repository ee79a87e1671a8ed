"""Building a business day's usage files from the database, checked before anything is kept.

- **Streaming.** One read transaction reads the day's postings once, summed in the database per
  call, account, kind and book, through a server-side cursor in call-sid order
  (`usage_store.day_postings_query`). That one pass writes the calls file call by call and adds
  up, per account and per book, the accounts' movements and balances. The calls' own columns
  and the settled calls' timelines (`timeline_store.load_timelines`) are loaded `CALLS_PER_BATCH`
  calls at a time, one query each. Memory holds one batch of calls and a few totals per account
  and book, whatever the day's volume.
- **Checked.** Every account reconciles (opening + movements = closing per book) and the calls
  file adds up to the accounts file (`meterd.core.usage.reconciliation`), or the build raises
  `UsageDoesNotReconcile` and keeps nothing.
- **Reproducible.** A file depends only on the database (never on when or where it was built),
  and a settled call's time is its timeline exactly as its settlement built it, so any daemon
  can rebuild a day. `business_timezone`, `increment_seconds` and `research_max_minutes` shape
  the report: changing them changes what a rebuild of an earlier day gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterd.clock import Clock
from meterd.core.usage.business_days import day_bounds
from meterd.core.usage.movements import Movements, PostingGroup
from meterd.core.usage.reconciliation import (
    AccountUsage,
    BookBalance,
    CallUsage,
    RowStatus,
    TimeFacts,
    UsageDoesNotReconcile,
    reconcile,
    tie_calls,
    time_facts,
)
from meterd.core.usage.render import (
    CALL_COLUMNS,
    Columns,
    call_csv_header,
    call_csv_lines,
    render_accounts_csv,
    render_accounts_json,
)
from meterd.services.usage_lease import LEASE_SECONDS
from meterd.services.usage_publish import (
    BuiltFiles,
    TempFile,
    UsageFile,
    remove_stale_temporaries,
)
from meterd.store import timeline_store, usage_store
from meterd.store.database import Database
from meterd.store.transaction import Transaction
from meterd.store.usage_store import STREAM_ROWS

HEARTBEAT_SECONDS = 60  # how often a build renews its claim
CALLS_PER_BATCH = 2000  # calls whose columns, events and marks are loaded by one query each
INBOUND = "inbound"  # `calls.direction` of a call meterd did not place (the column's default)

Heartbeat = Callable[[], Awaitable[None]]
Accounts = dict[str, tuple[str, dt.datetime]]  # account -> (currency, created at)


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
    direction: str
    movements: Movements = field(default_factory=Movements)


@dataclass
class _AccountCalls:
    """What the calls file says about one account, to fill and tie its row."""

    calls: int = 0
    hold_seconds: int = 0
    research_seconds: int = 0
    waivers: int = 0
    movements: Movements = field(default_factory=Movements)


@dataclass
class _Stream:
    """What one pass over the day's postings adds up, besides the calls file."""

    by_account: dict[str, _AccountCalls] = field(default_factory=dict)
    # (account, kind, reversed kind, waiver, book, unit) -> [amount, positive, postings]
    account_groups: dict[tuple[str, str, str | None, bool, str, str], list[int]] = field(
        default_factory=dict
    )
    day_by_book: dict[str, int] = field(default_factory=dict)  # the day's net per book
    call_error: UsageDoesNotReconcile | None = None  # the first call that does not add up


def _call_rows(
    call_sid: str, tx_account_id: str | None, movements: Movements, call: Any
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
            direction=INBOUND,  # as the column's default: every call not placed by meterd
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
        direction=call.direction,
        movements=movements,
    )


def _call_usage(
    call: _CallRows,
    start: dt.datetime,
    end: dt.datetime,
    known: Accounts,
    time: TimeFacts | None,
) -> CallUsage:
    if call.account_id is None or call.account_id not in known:
        raise UsageDoesNotReconcile(
            f"call {call.call_sid} has entries of the day but no known account"
        )
    settled = call.settled_at is not None and call.settled_at < end
    if not settled:
        status = RowStatus.OPEN
    elif call.settled_at is not None and call.settled_at >= start:
        status = RowStatus.SETTLED
    else:
        status = RowStatus.ADJUSTED
    waived = call.waived_at is not None and call.waived_at < end
    return CallUsage(
        call_sid=call.call_sid,
        account_id=call.account_id,
        plan=call.plan,
        currency=known[call.account_id][0],
        status=status,
        started_at=call.started_at,
        ended_at=call.ended_at if settled else None,
        settled_at=call.settled_at if settled else None,
        waiver_reason=call.waiver_reason if waived else None,
        time=time if status is RowStatus.SETTLED else None,
        movements=call.movements,
        direction=call.direction,
    )


class UsageBuilder:
    """Builds a day's three files into temporary files (`BuiltFiles`), for the service to put
    in place and record."""

    def __init__(
        self,
        database: Database,
        clock: Clock,
        directory: Path,
        *,
        timezone: str,
        increment_seconds: int,
        research_max_minutes: int,
    ) -> None:
        self._database = database
        self.clock = clock
        self.directory = directory
        self.timezone = timezone
        self._increment_seconds = increment_seconds
        self._research_max_seconds = research_max_minutes * 60

    async def build(
        self, day: dt.date, *, heartbeat: Heartbeat | None, call_columns: Columns = CALL_COLUMNS
    ) -> BuiltFiles:
        """Write the day's three files to temporary files; raise `UsageDoesNotReconcile` (and
        keep nothing) unless every account reconciles and the calls tie to the accounts.
        `call_columns`: the calls file's layout; an earlier one only to rebuild a day published
        in it (`render.CALL_COLUMNS_BEFORE_DIRECTION`)."""
        with _gc_passes_over_new_objects_only():
            return await self._build_files(day, heartbeat=heartbeat, call_columns=call_columns)

    async def _build_files(
        self, day: dt.date, *, heartbeat: Heartbeat | None, call_columns: Columns
    ) -> BuiltFiles:
        start, end = day_bounds(day, self.timezone)
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True, mode=0o700)
        await asyncio.to_thread(remove_stale_temporaries, self.directory, day, LEASE_SECONDS)
        built = BuiltFiles(day)
        try:
            for kind in UsageFile:
                built.files[kind] = TempFile(self.directory, kind.file_name(day))
            async with self._database.read() as connection:
                await usage_store.begin_report_read(connection)
                known = await usage_store.account_currencies(connection)
                balances = await usage_store.customer_book_balances(connection, end)
                stream = await _CallsWriter(
                    self, connection, day, (start, end), known, built, heartbeat, call_columns
                ).write()
            usages = self._account_usages(end, known, balances, stream)
            self._check(usages, stream)
            await self._write_accounts(day, list(usages.values()), built)
        except BaseException:
            built.discard()
            raise
        return built

    def _check(self, usages: dict[str, AccountUsage], stream: _Stream) -> None:
        """Fill the accounts' rows with what their calls add up to; each row must reconcile
        and tie to its calls."""
        if stream.call_error is not None:
            raise stream.call_error
        by_account = stream.by_account
        for account_id, facts in by_account.items():
            usage = usages.get(account_id)
            if usage is None:
                raise UsageDoesNotReconcile(
                    f"calls of account {account_id} have entries but the account has none"
                )
            usage.calls = facts.calls
            usage.hold_seconds = facts.hold_seconds
            usage.research_seconds = facts.research_seconds
            usage.waivers = facts.waivers
        for account_id in sorted(usages):
            reconcile(usages[account_id])
            tie_calls(
                usages[account_id],
                by_account.get(account_id, _AccountCalls()).movements,
            )

    async def _write_accounts(
        self, day: dt.date, ordered: list[AccountUsage], built: BuiltFiles
    ) -> None:
        calls_file = built.files[UsageFile.CALLS_CSV]
        await asyncio.to_thread(calls_file.close_synced)
        accounts_csv = built.files[UsageFile.ACCOUNTS_CSV]
        accounts_csv.write(render_accounts_csv(day, ordered))
        accounts_json = built.files[UsageFile.ACCOUNTS_JSON]
        accounts_json.write(
            render_accounts_json(
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

    def _account_usages(
        self,
        end: dt.datetime,
        known: Accounts,
        balances: Iterable[tuple[str, str, str, int, int]],
        stream: _Stream,
    ) -> dict[str, AccountUsage]:
        """Every account existing by the day's end, with its balances and the day's movements
        (a few groups per account, summed from the stream of the day's postings)."""
        usages = {
            account_id: AccountUsage(account_id, currency)
            for account_id, (currency, created_at) in known.items()
            if created_at < end
        }

        def usage_of(account_id: str) -> AccountUsage:
            if account_id not in usages:
                if account_id not in known:
                    raise UsageDoesNotReconcile(
                        f"entries of the day name account {account_id!r}, which does not exist"
                    )
                usages[account_id] = AccountUsage(account_id, known[account_id][0])
            return usages[account_id]

        for account_id, kind, book, balance, since_end in balances:
            closing = balance - since_end
            opening = closing - stream.day_by_book.get(book, 0)
            if account_id not in usages and opening == closing == 0:
                continue  # an account opened after the day
            usage_of(account_id).balances[kind] = BookBalance(opening, closing)
        for (account_id, kind, reversed_kind, waiver_memo, book, unit), (
            amount,
            positive,
            postings,
        ) in stream.account_groups.items():
            group = PostingGroup(
                kind, reversed_kind, waiver_memo, book, unit, amount, positive, postings
            )
            usage_of(account_id).movements.add(group, account_id)
        return usages

    async def time_facts(
        self, connection: Transaction, settled: list[_CallRows]
    ) -> dict[str, TimeFacts]:
        """Each settled call's time, from its timeline exactly as settlement built it: the events
        recorded up to settlement, open intervals counted to `settled_at`."""
        timelines = await timeline_store.load_timelines(
            connection, settled, self._research_max_seconds
        )
        return {
            call.call_sid: time_facts(timeline, self._increment_seconds)
            for call, timeline in timelines
        }


class _CallsWriter:
    """Streams the day's postings, grouped, in call-sid order: writes the calls' rows, and sums
    per account (the accounts' movements), per book (their balances) and what the call rows add
    up to per account. One pass over the day's postings does all three."""

    def __init__(
        self,
        builder: UsageBuilder,
        connection: Transaction,
        day: dt.date,
        bounds: tuple[dt.datetime, dt.datetime],
        known: Accounts,
        built: BuiltFiles,
        heartbeat: Heartbeat | None,
        columns: Columns,
    ) -> None:
        self._builder = builder
        self._columns = columns
        self._connection = connection
        self._day = day
        self._start, self._end = bounds
        self._known = known
        self._built = built
        self._heartbeat = heartbeat
        self._calls_file = built.files[UsageFile.CALLS_CSV]
        self._stream = _Stream()
        # calls streamed and not yet written: (call sid, account of its first row, movements)
        self._pending: list[tuple[str, str | None, Movements]] = []
        self._last_beat = builder.clock()

    async def write(self) -> _Stream:
        query = usage_store.day_postings_query(self._connection, self._start, self._end)
        self._calls_file.write(call_csv_header(self._columns))
        account_groups, day_by_book = self._stream.account_groups, self._stream.day_by_book
        pending = self._pending
        result = await self._connection.stream(query)
        current: str | None = None
        movements = Movements()
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
                    current, movements = call_sid, Movements()
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
                await self._flush(len(pending) - 1)
        if pending:
            await self._flush(len(pending))
        return self._stream

    async def _flush(self, count: int) -> None:
        """Write the first `count` pending calls (all of their rows have been read)."""
        pending, stream = self._pending, self._stream
        if stream.call_error is not None:
            del pending[:count]  # the day is refused; the stream still sums the accounts
            return
        columns = await usage_store.calls_of(
            self._connection, [sid for sid, _, _ in pending[:count]]
        )
        batch = [
            _call_rows(sid, account_id, movements, columns.get(sid))
            for sid, account_id, movements in pending[:count]
        ]
        del pending[:count]
        start, end = self._start, self._end
        times = await self._builder.time_facts(
            self._connection,
            [c for c in batch if c.settled_at is not None and start <= c.settled_at < end],
        )
        try:
            lines = call_csv_lines(self._day, self._usages(batch, times), self._columns)
        except UsageDoesNotReconcile as error:
            # raised after the accounts' own checks, which come first
            stream.call_error = error
            return
        self._calls_file.write(lines)
        self._built.calls_rows += len(batch)
        clock = self._builder.clock
        if self._heartbeat is not None and clock() - self._last_beat >= dt.timedelta(
            seconds=HEARTBEAT_SECONDS
        ):
            await self._heartbeat()
            self._last_beat = clock()

    def _usages(self, batch: list[_CallRows], times: dict[str, TimeFacts]) -> Iterator[CallUsage]:
        """The batch's rows, each added to what its account's calls add up to."""
        by_account = self._stream.by_account
        start, end = self._start, self._end
        for call in batch:
            row = _call_usage(call, start, end, self._known, times.get(call.call_sid))
            facts = by_account.get(row.account_id)
            if facts is None:
                facts = by_account[row.account_id] = _AccountCalls()
            facts.movements.merge(row.movements)
            if row.status is RowStatus.SETTLED and row.time is not None:
                facts.calls += 1
                facts.hold_seconds += row.time.hold_seconds
                facts.research_seconds += row.time.research_seconds
            if call.waived_at is not None and start <= call.waived_at < end:
                facts.waivers += 1
            yield row
