"""System books keep no running balance: a posting's trigger moves only customer books.

Until now every posting updated its book's `balance` row, system books included, and every
metered minute posts to `system:minutes:used`: each such transaction row-locked that one hot row
until it committed, and transactions that reached two system books in opposite orders deadlocked
on PostgreSQL (defect 14 of issue 11). Nothing needs a system book's running balance: the
non-negative CHECK only guards customer books (bank, deposit; receivable may go negative), and
reports read customer books. So:

- the trigger moves the balance of customer books only (`customer:...`); a posting to a book
  whose name starts with `system:` touches no `ledger_books` row, so no transaction ever locks a
  system book (the foreign key of the posting takes PostgreSQL's FOR KEY SHARE on it, which
  conflicts with no other posting and with no balance update);
- every system book's stored `balance` is set to 0 and stays 0. The column is kept (one table,
  one CHECK for every book), but for a system book it is not the balance: a system book's balance
  is the sum of its postings, which `ledger_store.balance()` returns, and `meterd ledger check`
  reports a system book whose stored balance is not 0.

Whether a book is a system book is read from its name (the kind column agrees: `meterd ledger
check` verifies that kind is 'system' exactly for the books named `system:...`), so the trigger
needs no read of `ledger_books` to decide.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The exact test used by the trigger and by `meterd ledger check` (LIKE would be case-insensitive
# on SQLite).
IS_CUSTOMER_BOOK = "substr({book}, 1, 7) <> 'system:'"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Same function name, so the trigger (0001) picks up the new body; CREATE OR REPLACE
        # takes the function's lock only, and migrations run under the advisory migration lock.
        op.execute(
            "CREATE OR REPLACE FUNCTION meterd_move_balance() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            f"IF {IS_CUSTOMER_BOOK.format(book='NEW.book')} THEN "
            "UPDATE ledger_books SET balance = balance + NEW.amount WHERE book = NEW.book; "
            "END IF; RETURN NULL; END $$"
        )
    else:
        op.execute("DROP TRIGGER ledger_postings_move_balance")
        op.execute(
            "CREATE TRIGGER ledger_postings_move_balance AFTER INSERT ON ledger_postings "
            f"WHEN {IS_CUSTOMER_BOOK.format(book='NEW.book')} "
            "BEGIN UPDATE ledger_books SET balance = balance + NEW.amount "
            "WHERE book = NEW.book; END"
        )
    op.execute(
        "UPDATE ledger_books SET balance = 0 "
        f"WHERE NOT ({IS_CUSTOMER_BOOK.format(book='book')}) AND balance <> 0"
    )


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
