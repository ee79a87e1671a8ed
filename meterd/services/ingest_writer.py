"""Group commit for Twilio's conference and call-status callbacks: one writer task per process.

A durable commit costs an fsync (SQLite) or a round trip and a WAL flush (PostgreSQL); one per
callback caps ingest far below what the web edge can take. So each handler puts its callback in a
bounded queue and waits; the writer takes every callback waiting (at most `batch_max`), records
them all in one write transaction (`IngestService.record_batch`: each one checked and recorded as
if alone, in arrival order, a refused one leaving nothing of itself), commits once, and only then
resolves each handler's future with its own outcome. No callback is answered 2xx before the
commit that holds it.

If the batch's transaction fails, every callback of it fails with that error: an outage sends
each to the webhook journal, exactly as a single callback's failed offer does
(`meterd/services/intake.py`). An error that is not an outage (a fault in one callback) is
retried one callback at a time, so one bad callback cannot fail its neighbours.

The queue is bounded (`webhook_queue_max`): when it is full the callback is refused at once
(`QueueFull`, a 503 with Retry-After; Twilio retries) rather than waiting longer than Twilio
would. A handler that stops waiting (its callback journaled as slow) withdraws its callback if
the writer has not taken it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meterd.logs import get_logger
from meterd.services.ingest import Callback, IngestService, Recorded
from meterd.store.outage import is_unavailable

log = get_logger("meterd.ingest_writer")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class QueueFull(Exception):
    """The writer's queue is full (or the writer has stopped): answer 503 with Retry-After."""


class WriterStopped(Exception):
    """The writer stopped before it could take the callback; it was not recorded."""


@dataclass(eq=False)
class Ticket:
    """One callback waiting for the writer: `future` resolves after the commit that holds it."""

    callback: Callback
    future: asyncio.Future[Recorded] = field(repr=False)
    taken: bool = False
    withdrawn: bool = False

    def withdraw(self) -> bool:
        """The handler stopped waiting: True if the writer had not taken the callback yet
        (it never will now), False if it is being written (it finishes on its own)."""
        if self.taken:
            return False
        self.withdrawn = True
        return True


class IngestWriter:
    """The one writer task; `start()` it inside the running loop (`submit` starts it too, for
    an app run without the daemon's lifecycle), `stop()` it when no request is left."""

    def __init__(
        self,
        ingest: IngestService,
        *,
        queue_max: int,
        batch_max: int,
        registry: CollectorRegistry,
    ) -> None:
        self._ingest = ingest
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._queue: asyncio.Queue[Ticket] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.refused = Counter(
            "meterd_webhook_queue_full",
            "callbacks answered 503 because the writer's queue was full, by route",
            ["route"],
            registry=registry,
        )
        self.batch_sizes = Histogram(
            "meterd_webhook_batch_size",
            "callbacks recorded per write transaction (group commit)",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        depth = Gauge(
            "meterd_webhook_queue_depth",
            "callbacks waiting for the writer",
            registry=registry,
        )
        depth.set_function(lambda: self.depth)

    def start(self) -> None:
        """Start the writer task (once) on the running loop."""
        if self._task is None and not self._stopped:
            self._queue = asyncio.Queue(self._queue_max)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ingest-writer")

    def submit(self, callback: Callback) -> Ticket:
        """Queue `callback` for the next batch; raises QueueFull if the queue is full."""
        self.start()
        if self._stopped or self._queue is None:
            raise QueueFull("meterd is stopping")
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        ticket = Ticket(callback, future)
        try:
            self._queue.put_nowait(ticket)
        except asyncio.QueueFull:
            self.refused.labels(callback.route).inc()
            raise QueueFull(f"{self._queue_max} callbacks are waiting for the database") from None
        return ticket

    def refuse_if_full(self, route: str) -> None:
        """Raise QueueFull, counted as `submit` counts it, if a callback of `route` would be
        refused now: the web layer sheds load with it before it reads and checks a body."""
        if self._queue is not None and self._queue.full():
            self.refused.labels(route).inc()
            raise QueueFull(f"{self._queue_max} callbacks are waiting for the database")

    @property
    def depth(self) -> int:
        """Callbacks waiting for the writer now."""
        return 0 if self._queue is None else self._queue.qsize()

    async def drained(self) -> None:
        """Until every callback queued so far has its outcome (or was withdrawn)."""
        if self._queue is not None:
            await self._queue.join()

    async def stop(self, timeout_seconds: float) -> None:
        """Take no more callbacks; let the writer record those it holds (at most
        `timeout_seconds`), then end it. What it could not take fails with WriterStopped."""
        self._stopped = True
        task, queue = self._task, self._queue
        if task is None or queue is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_seconds):
                await self.drained()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        while not queue.empty():
            _fail(queue.get_nowait(), WriterStopped("meterd stopped before recording it"))

    async def _run(self) -> None:
        queue = self._queue
        if queue is None:
            raise RuntimeError("the writer runs only once started")
        while True:
            batch = [await queue.get()]
            while len(batch) < self._batch_max and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._write([ticket for ticket in batch if not ticket.withdrawn])
            except asyncio.CancelledError:
                for ticket in batch:
                    _fail(ticket, WriterStopped("meterd stopped while recording it"))
                raise
            except Exception as error:  # a fault of the writer's own: it must go on
                log.exception("the webhook writer failed a batch")
                for ticket in batch:
                    _fail(ticket, error)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _write(self, batch: Sequence[Ticket]) -> None:
        """One transaction for `batch`, then each handler its outcome."""
        if not batch:
            return
        for ticket in batch:
            ticket.taken = True
        try:
            outcomes = await self._ingest.record_batch([ticket.callback for ticket in batch])
        except Exception as error:
            if len(batch) > 1 and not is_unavailable(error):
                log.warning(
                    "a batch of callbacks failed; recording them one at a time",
                    callbacks=len(batch),
                    error=type(error).__name__,
                )
                for ticket in batch:
                    await self._write([ticket])
                return
            for ticket in batch:
                _fail(ticket, error)
            return
        self.batch_sizes.observe(len(batch))
        for ticket, outcome in zip(batch, outcomes, strict=True):
            if ticket.future.done():
                continue
            if isinstance(outcome, Recorded):
                ticket.future.set_result(outcome)
            else:
                ticket.future.set_exception(outcome)


def _fail(ticket: Ticket, error: BaseException) -> None:
    if not ticket.future.done():
        ticket.future.set_exception(error)


def _retrieve(future: asyncio.Future[Recorded]) -> None:
    """A handler that stopped waiting never reads its callback's error; the intake logs it
    (or the journal holds the callback), so asyncio need not warn of it."""
    if not future.cancelled():
        future.exception()
