"""Alembic environment: meterd always hands Alembic an open connection (see database.py)."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `meterd db upgrade`, which supplies the connection")

context.configure(connection=connection, target_metadata=None, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
