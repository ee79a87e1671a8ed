"""The nightly usage's table, `usage_runs` (migration 0005), on the shared `metadata`.

One row per business day, claimed before the day is built, so two daemons on one database, a
restart or a missed night produce each day once. `status`:
- `building`: claimed by `claimed_by` at `claimed_at`; another daemon may take it over once the
  claim is older than the lease (a crashed builder), which the builder renews while it works;
- `published`: the files are written; their SHA-256 are recorded, so any daemon can rebuild a
  missing file and prove it identical;
- `refused`: the report did not reconcile or the ledger broke an invariant; `detail` says why.
  The next run tries again;
- `failed`: the build stopped on an unexpected error; the next run tries again.

Also two indexes on `calls`, for the calls settled or waived on a day.
"""

from __future__ import annotations

from sqlalchemy import Column, Date, Index, String, Table, Text

from meterd.store.schema import UtcDateTime, calls, metadata

usage_runs = Table(
    "usage_runs",
    metadata,
    Column("business_day", Date, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("claimed_by", String(128), nullable=False),
    Column("claimed_at", UtcDateTime, nullable=False),
    Column("accounts_csv_sha256", String(64), nullable=True),
    Column("accounts_json_sha256", String(64), nullable=True),
    Column("calls_csv_sha256", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Column("published_at", UtcDateTime, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
)

Index("ix_calls_settled_at", calls.c.settled_at)
Index("ix_calls_waived_at", calls.c.waived_at)
