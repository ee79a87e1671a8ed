"""Nightly usage: one run per business day (claimed, then published or refused, with the files'
SHA-256), and indexes for the calls settled or waived on a day.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UtcDateTime = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "usage_runs",
        sa.Column("business_day", sa.Date, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(128), nullable=False),
        sa.Column("claimed_at", UtcDateTime, nullable=False),
        sa.Column("accounts_csv_sha256", sa.String(64), nullable=True),
        sa.Column("accounts_json_sha256", sa.String(64), nullable=True),
        sa.Column("calls_csv_sha256", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("published_at", UtcDateTime, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_index("ix_calls_settled_at", "calls", ["settled_at"])
    op.create_index("ix_calls_waived_at", "calls", ["waived_at"])


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
