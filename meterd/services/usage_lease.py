"""The lease on a business day's usage run: whoever holds it builds the day, once.

A run claims its day in `usage_runs` (`INSERT ... ON CONFLICT DO NOTHING`) before building; a
second daemon, or a second job in this one, finds the claim and moves on. A claim is renewed
while the build runs and may be taken over once it is `LEASE_SECONDS` old (its builder died), as
may a refused or failed day. A run is finished (published, refused, failed) only under the claim
that built it: a builder whose claim was taken over leaves the result to the one that took it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from typing import Any

from meterd.clock import Clock
from meterd.logs import get_logger
from meterd.services.usage_publish import UsageFile
from meterd.store import usage_store
from meterd.store.database import Database
from meterd.store.usage_store import RunStatus

log = get_logger("meterd.usage")

LEASE_SECONDS = 600  # a claim older than this, not renewed, belongs to a builder that died


class UsageLease:
    """This daemon's claims on days of usage (`instance` names it in `usage_runs.claimed_by`)."""

    def __init__(self, database: Database, clock: Clock, instance: str | None = None) -> None:
        self._database = database
        self._clock = clock
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def claim(self, day: dt.date) -> bool:
        """Take the day: True if it is ours to build now."""
        now = self._clock()
        async with self._database.write() as connection:
            if await usage_store.insert_claim(connection, day, self.instance, now):
                return True
            run = await usage_store.lock_run(connection, day)
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
            await usage_store.take_claim(connection, day, self.instance, now)
            return True

    async def renew(self, day: dt.date) -> None:
        async with self._database.write() as connection:
            renewed = await usage_store.update_claimed_run(
                connection, day, self.instance, claimed_at=self._clock()
            )
        if not renewed:
            log.warning("lost the claim on a usage build", business_day=str(day))

    async def finish(
        self,
        day: dt.date,
        status: RunStatus,
        *,
        sha256: dict[UsageFile, str] | None = None,
        detail: str | None = None,
    ) -> bool:
        """Record how the claimed day ended (with the files' SHA-256, once published):
        False if another daemon took the claim over, whose result then stands."""
        values: dict[str, Any] = {"status": status.value, "detail": detail}
        if sha256 is not None:
            values.update({kind.sha_column: digest for kind, digest in sha256.items()})
            values["published_at"] = self._clock()
        async with self._database.write() as connection:
            finished = await usage_store.update_claimed_run(
                connection, day, self.instance, **values
            )
        if not finished:
            log.warning(
                "another daemon took over this usage build; its result stands",
                business_day=str(day),
            )
        return finished
