"""Live metering: per-agent minutes posted, the call's next due time and settlement, rates with
an effective time, waivers and incident groups, an outbox for Twilio REST requests, and a
transaction reversed at most once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UtcDateTime = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("calls", sa.Column("next_due_at", UtcDateTime, nullable=True))
    op.add_column("calls", sa.Column("settled_at", UtcDateTime, nullable=True))
    op.add_column("calls", sa.Column("incident_group", sa.String(64), nullable=True))
    op.add_column("calls", sa.Column("waived_at", UtcDateTime, nullable=True))
    op.add_column("calls", sa.Column("waiver_reason", sa.String(64), nullable=True))
    op.add_column("calls", sa.Column("warned_at", UtcDateTime, nullable=True))
    op.add_column("calls", sa.Column("exhausted_at", UtcDateTime, nullable=True))
    op.create_index("ix_calls_next_due_at", "calls", ["next_due_at"])
    op.create_table(
        "call_agent_minutes",
        sa.Column("call_sid", sa.String(64), sa.ForeignKey("calls.call_sid"), primary_key=True),
        sa.Column("agent_id", sa.String(128), primary_key=True),
        sa.Column("minutes_posted", sa.Integer, nullable=False),
    )
    op.create_table(
        "rates",
        sa.Column("rate_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("effective_from", UtcDateTime, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint(
            "kind", "currency", "effective_from", name="uq_rates_kind_currency_effective_from"
        ),
        sa.CheckConstraint("amount_minor >= 0", name="ck_rates_amount_not_negative"),
    )
    op.create_table(
        "outbox",
        sa.Column("outbox_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("request_key", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("target_sid", sa.String(64), nullable=False),
        sa.Column("argument", sa.Text, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("done_at", UtcDateTime, nullable=True),
        sa.Column("failed_at", UtcDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_outbox_pending", "outbox", ["done_at", "failed_at"])
    op.create_index(
        "uq_ledger_transactions_reverses_key", "ledger_transactions", ["reverses_key"], unique=True
    )


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
