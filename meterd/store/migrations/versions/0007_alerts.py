"""Low-balance alerts: each account's thresholds (null: the settings' default; a table of
their own, so the accounts table and what reads it stay as they were), where each of
its balances stands against its threshold (so a crossing is told once), and the alerts to
deliver to the desk's URL (an outbox of their own, retried with backoff). And auto top-up: the
banked minutes below which a block is bought on the card on file (null: off).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UtcDateTime = sa.DateTime(timezone=True)
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "account_thresholds",
        sa.Column(
            "account_id", sa.String(64), sa.ForeignKey("accounts.account_id"), primary_key=True
        ),
        sa.Column("alert_bank_minutes_below", sa.Integer, nullable=True),
        sa.Column("alert_deposit_minor_below", sa.BigInteger, nullable=True),
        sa.Column("auto_top_up_below_minutes", sa.Integer, nullable=True),
    )
    op.create_table(
        "alert_states",
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("balance", sa.String(16), primary_key=True),
        sa.Column("below", sa.Boolean, nullable=False),
        sa.Column("changed_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "alerts",
        sa.Column("alert_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(200), nullable=False, unique=True),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("body_json", sa.Text, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UtcDateTime, nullable=True),
        sa.Column("delivered_at", UtcDateTime, nullable=True),
        sa.Column("failed_at", UtcDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_alerts_due", "alerts", ["delivered_at", "failed_at", "next_attempt_at"])


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
