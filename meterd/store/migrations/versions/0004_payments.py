"""Card payments: every gateway operation recorded before it is sent, the card on file, and the
caller's payment attempts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UtcDateTime = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "payment_operations",
        sa.Column("operation_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("operation_key", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column(
            "account_id", sa.String(64), sa.ForeignKey("accounts.account_id"), nullable=False
        ),
        sa.Column("call_sid", sa.String(64), nullable=True),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("minutes", sa.Integer, nullable=False),
        sa.Column("related_key", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("gateway_reference", sa.String(255), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("completed_at", UtcDateTime, nullable=True),
    )
    op.create_index("ix_payment_operations_status", "payment_operations", ["status"])
    op.create_index("ix_payment_operations_call_sid", "payment_operations", ["call_sid"])
    op.add_column("accounts", sa.Column("card_customer", sa.String(255), nullable=True))
    op.add_column("accounts", sa.Column("card_brand", sa.String(32), nullable=True))
    op.add_column("accounts", sa.Column("card_last4", sa.String(4), nullable=True))
    op.add_column(
        "calls", sa.Column("pay_attempts", sa.Integer, nullable=False, server_default="0")
    )


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
