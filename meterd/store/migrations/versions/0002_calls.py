"""Calls, the raw record of every accepted Twilio webhook, and agents' research marks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UtcDateTime = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_sid", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.account_id"), nullable=True),
        sa.Column("plan", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("from_number", sa.String(64), nullable=False),
        sa.Column("conference_sid", sa.String(64), nullable=True),
        sa.Column("pin_attempts", sa.Integer, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("ended_at", UtcDateTime, nullable=True),
        sa.Column("end_reason", sa.String(64), nullable=True),
        sa.Column("closed_by_sweeper", sa.Boolean, nullable=False),
        sa.Column("last_event_at", UtcDateTime, nullable=False),
    )
    op.create_index("ix_calls_account_id", "calls", ["account_id"])
    op.create_index("ix_calls_status", "calls", ["status"])
    op.create_table(
        "webhook_events",
        sa.Column("event_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("dedup_key", sa.String(200), nullable=False, unique=True),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("sequence_number", sa.BigInteger, nullable=True),
        sa.Column("event_at", UtcDateTime, nullable=True),
        sa.Column("participant_sid", sa.String(64), nullable=True),
        sa.Column("label", sa.String(128), nullable=True),
        sa.Column("hold", sa.Boolean, nullable=True),
        sa.Column("params_json", sa.Text, nullable=False),
        sa.Column("received_at", UtcDateTime, nullable=False),
    )
    op.create_index("ix_webhook_events_call_sid", "webhook_events", ["call_sid"])
    op.create_table(
        "research_marks",
        sa.Column("mark_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("call_sid", sa.String(64), sa.ForeignKey("calls.call_sid"), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("start_at", UtcDateTime, nullable=False),
        sa.Column("end_at", UtcDateTime, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("call_sid", "agent_id", "start_at", name="uq_research_marks_start"),
    )
    op.create_index("ix_research_marks_call_sid", "research_marks", ["call_sid"])


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
