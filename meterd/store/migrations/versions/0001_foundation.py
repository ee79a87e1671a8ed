"""Foundation: accounts, caller IDs and the double-entry ledger.

The database itself guards the ledger: postings and transactions cannot be updated or deleted
(triggers), every posting moves its book's balance (trigger), and a balance that would go below
zero on a book that does not allow debt aborts the whole transaction (CHECK).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UtcDateTime = sa.DateTime(timezone=True)

APPEND_ONLY_TABLES = ("ledger_transactions", "ledger_postings")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("fallback_plan", sa.String(32), nullable=False),
        sa.Column("valid_until", sa.Date, nullable=True),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("pin_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("products_json", sa.Text, nullable=False),
        sa.Column("card_on_file", sa.String(255), nullable=True),
        sa.Column("debt_flagged", sa.Boolean, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "caller_ids",
        sa.Column("number", sa.String(16), primary_key=True),
        sa.Column(
            "account_id", sa.String(64), sa.ForeignKey("accounts.account_id"), primary_key=True
        ),
    )
    op.create_table(
        "ledger_books",
        sa.Column("book", sa.String(200), primary_key=True),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.account_id"), nullable=True),
        sa.Column("allow_negative", sa.Boolean, nullable=False),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("book", "unit", name="uq_ledger_books_book_unit"),
        sa.CheckConstraint(
            "allow_negative OR balance >= 0", name="ck_ledger_books_balance_not_negative"
        ),
    )
    op.create_table(
        "ledger_transactions",
        sa.Column("transaction_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(255), nullable=False, unique=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=True),
        sa.Column("call_sid", sa.String(64), nullable=True),
        sa.Column("reverses_key", sa.String(255), nullable=True),
        sa.Column("memo", sa.Text, nullable=False),
        sa.Column("posted_at", UtcDateTime, nullable=False),
    )
    op.create_index("ix_ledger_transactions_account_id", "ledger_transactions", ["account_id"])
    op.create_index("ix_ledger_transactions_call_sid", "ledger_transactions", ["call_sid"])
    op.create_index("ix_ledger_transactions_posted_at", "ledger_transactions", ["posted_at"])
    op.create_table(
        "ledger_postings",
        sa.Column("posting_id", RowId, primary_key=True, autoincrement=True),
        sa.Column(
            "transaction_id",
            RowId,
            sa.ForeignKey("ledger_transactions.transaction_id"),
            nullable=False,
        ),
        sa.Column("book", sa.String(200), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.ForeignKeyConstraint(
            ["book", "unit"],
            ["ledger_books.book", "ledger_books.unit"],
            name="fk_ledger_postings_book_unit",
        ),
        sa.CheckConstraint("amount <> 0", name="ck_ledger_postings_amount_not_zero"),
    )
    op.create_index("ix_ledger_postings_transaction_id", "ledger_postings", ["transaction_id"])
    op.create_index("ix_ledger_postings_book", "ledger_postings", ["book"])

    if op.get_bind().dialect.name == "postgresql":
        _postgresql_guards()
    else:
        _sqlite_guards()


def _sqlite_guards() -> None:
    for table in APPEND_ONLY_TABLES:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'ledger is append-only: {action} on {table} "
                f"refused'); END"
            )
    op.execute(
        "CREATE TRIGGER ledger_postings_move_balance AFTER INSERT ON ledger_postings "
        "BEGIN UPDATE ledger_books SET balance = balance + NEW.amount "
        "WHERE book = NEW.book; END"
    )


def _postgresql_guards() -> None:
    op.execute(
        "CREATE FUNCTION meterd_refuse_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'ledger is append-only: % on % refused', TG_OP, TG_TABLE_NAME "
        "USING ERRCODE = 'integrity_constraint_violation'; END $$"
    )
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
            f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION meterd_refuse_ledger_change()"
        )
    op.execute(
        "CREATE FUNCTION meterd_move_balance() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN UPDATE ledger_books SET balance = balance + NEW.amount WHERE book = NEW.book; "
        "RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER ledger_postings_move_balance AFTER INSERT ON ledger_postings "
        "FOR EACH ROW EXECUTE FUNCTION meterd_move_balance()"
    )


def downgrade() -> None:
    raise NotImplementedError("the ledger is append-only; restore from a backup instead")
