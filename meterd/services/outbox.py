"""Requests to Twilio's REST API, recorded first and sent after (an outbox).

Metering decides, in its database transaction, that the conference must hear an announcement or
that a call must end, and records that request under a deterministic key
(`Repositories.outbox.enqueue`, meterd/store/repositories.py); the dispatcher sends
it afterwards through the one Twilio REST adapter. So a request is never lost to a crash, never
recorded twice, and a slow or failing Twilio never holds up metering. A request the adapter could
not deliver after its bounded retries is marked failed and logged; it is not retried forever.
A crash between sending and marking it done sends it once more on restart (an announcement or a
hang-up twice is harmless; one lost is not).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from meterd.clock import Clock
from meterd.logs import get_logger
from meterd.store import outbox_store
from meterd.store.database import Database

log = get_logger("meterd.outbox")

DISPATCH_BATCH_MAX = 100


class OutboxKind(StrEnum):
    ANNOUNCE = "announce"  # play `argument` (a TwiML URL) to conference `target_sid`
    HANG_UP = "hang_up"  # end call `target_sid`


class TwilioCalls(Protocol):
    async def announce_to_conference(self, conference_sid: str, announce_url: str) -> None: ...

    async def hang_up(self, call_sid: str) -> None: ...


class OutboxDispatcher:
    def __init__(self, database: Database, twilio: TwilioCalls | None, clock: Clock) -> None:
        self._database = database
        self._twilio = twilio
        self._clock = clock

    async def dispatch(self) -> int:
        """Send pending requests; returns how many were delivered."""
        if self._twilio is None:
            return 0
        async with self._database.read() as connection:
            pending = await outbox_store.pending_requests(connection, DISPATCH_BATCH_MAX)
        delivered = 0
        for request in pending:
            async with self._database.write() as connection:  # claim this attempt
                claimed = await outbox_store.claim_attempt(
                    connection, request.outbox_id, request.attempts
                )
            if not claimed:
                continue  # another daemon has it
            try:
                if request.kind == OutboxKind.ANNOUNCE:
                    await self._twilio.announce_to_conference(request.target_sid, request.argument)
                else:
                    await self._twilio.hang_up(request.target_sid)
            except Exception as error:  # the adapter already retried; record and go on
                log.error(
                    "twilio request failed",
                    kind=request.kind,
                    request_key=request.request_key,
                    call_sid=request.call_sid,
                    error=str(error)[:300],
                )
                async with self._database.write() as connection:
                    await outbox_store.mark_failed(
                        connection, request.outbox_id, self._clock(), str(error)[:1000]
                    )
                continue
            async with self._database.write() as connection:
                await outbox_store.mark_done(connection, request.outbox_id, self._clock())
            delivered += 1
            log.info("twilio request delivered", kind=request.kind, call_sid=request.call_sid)
        return delivered
