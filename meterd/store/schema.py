"""Tables, as SQLAlchemy Core metadata, for queries. The schema itself is made only by the
Alembic migrations in `migrations/versions`; `tests/integration/test_migrations.py` checks that
the two agree."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

metadata = MetaData()

# Row ids: BIGINT on PostgreSQL; INTEGER PRIMARY KEY (the rowid) on SQLite.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime on both backends (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


accounts = Table(
    "accounts",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("plan", String(32), nullable=False),
    Column("fallback_plan", String(32), nullable=False),
    Column("valid_until", Date, nullable=True),
    Column("currency", String(3), nullable=False),
    Column("pin_hash", String(64), nullable=True, unique=True),
    Column("products_json", Text, nullable=False),
    Column("card_on_file", String(255), nullable=True),
    Column("debt_flagged", Boolean, nullable=False),
    # card on file (0004): the gateway's customer and payment method, brand and last four only
    Column("card_customer", String(255), nullable=True),
    Column("card_brand", String(32), nullable=True),
    Column("card_last4", String(4), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# An account's own thresholds (0007): low-balance alerts (null: the settings' default), and auto
# top-up, a block bought when banked minutes fall below it (null: off). No row: all null.
account_thresholds = Table(
    "account_thresholds",
    metadata,
    Column("account_id", String(64), ForeignKey("accounts.account_id"), primary_key=True),
    Column("alert_bank_minutes_below", Integer, nullable=True),
    Column("alert_deposit_minor_below", BigInteger, nullable=True),
    Column("auto_top_up_below_minutes", Integer, nullable=True),
)

# Where each balance of an account stands against its alert threshold (0007): a crossing below
# is told once, and again only after the balance has come back up.
alert_states = Table(
    "alert_states",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("balance", String(16), primary_key=True),
    Column("below", Boolean, nullable=False),
    Column("changed_at", UtcDateTime, nullable=False),
)

# Reconciliation with Twilio's call records (0008): one report per business day.
reconciliations = Table(
    "reconciliations",
    metadata,
    Column("business_day", Date, primary_key=True),
    Column("report_json", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

# Alerts to deliver to the desk's URL (0007), retried with backoff until delivered or given up.
alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", RowId, primary_key=True, autoincrement=True),
    Column("event_id", String(200), nullable=False, unique=True),
    Column("account_id", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("body_json", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UtcDateTime, nullable=True),
    Column("delivered_at", UtcDateTime, nullable=True),
    Column("failed_at", UtcDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Index("ix_alerts_due", "delivered_at", "failed_at", "next_attempt_at"),
)

caller_ids = Table(
    "caller_ids",
    metadata,
    Column("number", String(16), primary_key=True),
    Column("account_id", String(64), ForeignKey("accounts.account_id"), primary_key=True),
)

ledger_books = Table(
    "ledger_books",
    metadata,
    Column("book", String(200), primary_key=True),
    Column("unit", String(16), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("account_id", String(64), ForeignKey("accounts.account_id"), nullable=True),
    Column("allow_negative", Boolean, nullable=False),
    # A customer book's running balance, kept by a trigger on every posting; `meterd ledger check`
    # re-sums it from the postings. A system book (`system:...`) keeps none (migration 0006): its
    # stored balance stays 0 and its balance is the sum of its postings (`ledger_store.balance`).
    Column("balance", BigInteger, nullable=False),
    UniqueConstraint("book", "unit", name="uq_ledger_books_book_unit"),
    CheckConstraint("allow_negative OR balance >= 0", name="ck_ledger_books_balance_not_negative"),
)

ledger_transactions = Table(
    "ledger_transactions",
    metadata,
    Column("transaction_id", RowId, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("fingerprint", String(64), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("account_id", String(64), nullable=True, index=True),
    Column("call_sid", String(64), nullable=True, index=True),
    Column("reverses_key", String(255), nullable=True),  # unique: reversed at most once
    Column("memo", Text, nullable=False),
    Column("posted_at", UtcDateTime, nullable=False, index=True),
    Index("uq_ledger_transactions_reverses_key", "reverses_key", unique=True),
)

ledger_postings = Table(
    "ledger_postings",
    metadata,
    Column("posting_id", RowId, primary_key=True, autoincrement=True),
    Column(
        "transaction_id",
        RowId,
        ForeignKey("ledger_transactions.transaction_id"),
        nullable=False,
        index=True,
    ),
    Column("book", String(200), nullable=False, index=True),
    Column("unit", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    ForeignKeyConstraint(
        ["book", "unit"],
        ["ledger_books.book", "ledger_books.unit"],
        name="fk_ledger_postings_book_unit",
    ),
    CheckConstraint("amount <> 0", name="ck_ledger_postings_amount_not_zero"),
)

calls = Table(
    "calls",
    metadata,
    Column("call_sid", String(64), primary_key=True),
    Column("account_id", String(64), ForeignKey("accounts.account_id"), nullable=True, index=True),
    Column("plan", String(32), nullable=True),
    Column("status", String(16), nullable=False, index=True),
    Column("from_number", String(64), nullable=False),
    Column("conference_sid", String(64), nullable=True),
    Column("pin_attempts", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("end_reason", String(64), nullable=True),
    Column("closed_by_sweeper", Boolean, nullable=False),
    Column("last_event_at", UtcDateTime, nullable=False),
    # metering (0003)
    Column("next_due_at", UtcDateTime, nullable=True, index=True),
    Column("settled_at", UtcDateTime, nullable=True),
    Column("incident_group", String(64), nullable=True),
    Column("waived_at", UtcDateTime, nullable=True),
    Column("waiver_reason", String(64), nullable=True),
    Column("warned_at", UtcDateTime, nullable=True),
    Column("exhausted_at", UtcDateTime, nullable=True),
    Column("pay_attempts", Integer, nullable=False, server_default="0"),  # (0004)
    Column("direction", String(16), nullable=False, server_default="inbound"),  # (0009)
)

# Callbacks the desk asked meterd to place (0009), one per client reference; `call_sid` once
# Twilio gave the call one. `status`: see meterd/services/callbacks.py.
callbacks = Table(
    "callbacks",
    metadata,
    Column("callback_id", String(40), primary_key=True),
    Column("client_reference", String(128), nullable=False, unique=True),
    Column("request_sha256", String(64), nullable=False),
    Column("account_id", String(64), ForeignKey("accounts.account_id"), nullable=False),
    Column("agent_id", String(64), nullable=False),
    Column("to_number", String(64), nullable=False),
    Column("call_sid", String(64), nullable=True, unique=True),
    Column("status", String(24), nullable=False),
    Column("reason", Text, nullable=True),
    Column("requested_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

webhook_events = Table(
    "webhook_events",
    metadata,
    Column("event_id", RowId, primary_key=True, autoincrement=True),
    Column("dedup_key", String(200), nullable=False, unique=True),
    Column("route", String(32), nullable=False),
    Column("call_sid", String(64), nullable=False, index=True),
    Column("kind", String(64), nullable=False),
    Column("sequence_number", BigInteger, nullable=True),
    Column("event_at", UtcDateTime, nullable=True),
    Column("participant_sid", String(64), nullable=True),
    Column("label", String(128), nullable=True),
    Column("hold", Boolean, nullable=True),
    Column("params_json", Text, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
)

research_marks = Table(
    "research_marks",
    metadata,
    Column("mark_id", RowId, primary_key=True, autoincrement=True),
    Column("call_sid", String(64), ForeignKey("calls.call_sid"), nullable=False, index=True),
    Column("agent_id", String(128), nullable=False),
    Column("start_at", UtcDateTime, nullable=False),
    Column("end_at", UtcDateTime, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("call_sid", "agent_id", "start_at", name="uq_research_marks_start"),
)

call_agent_minutes = Table(
    "call_agent_minutes",
    metadata,
    Column("call_sid", String(64), ForeignKey("calls.call_sid"), primary_key=True),
    Column("agent_id", String(128), primary_key=True),
    # How many of this agent's minutes on this call are in the ledger: moved only in the same
    # transaction as the postings, so it never runs ahead of them.
    Column("minutes_posted", Integer, nullable=False),
)

rates = Table(
    "rates",
    metadata,
    Column("rate_id", RowId, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("effective_from", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint(
        "kind", "currency", "effective_from", name="uq_rates_kind_currency_effective_from"
    ),
    CheckConstraint("amount_minor >= 0", name="ck_rates_amount_not_negative"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("outbox_id", RowId, primary_key=True, autoincrement=True),
    Column("request_key", String(200), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("call_sid", String(64), nullable=False),
    Column("target_sid", String(64), nullable=False),
    Column("argument", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("done_at", UtcDateTime, nullable=True),
    Column("failed_at", UtcDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Index("ix_outbox_pending", "done_at", "failed_at"),
)

payment_operations = Table(
    "payment_operations",
    metadata,
    Column("operation_id", RowId, primary_key=True, autoincrement=True),
    # e.g. call:<sid>:block:<n>; also the gateway's idempotency key
    Column("operation_key", String(200), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # charge, authorize, capture, release, refund
    Column("account_id", String(64), ForeignKey("accounts.account_id"), nullable=False),
    Column("call_sid", String(64), nullable=True, index=True),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("minutes", Integer, nullable=False),
    Column("related_key", String(200), nullable=True),  # the charge a refund or capture is of
    Column("status", String(16), nullable=False, index=True),  # pending, succeeded, failed
    Column("gateway_reference", String(255), nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("completed_at", UtcDateTime, nullable=True),
)
