"""What a service holds of the database: one open transaction, and the rows it reads.

Services never build SQL (tests/unit/test_sql_only_in_store.py): they get a `Transaction` from
`Database.write()` or `Database.read()` and pass it to the store's functions, which run the
queries and return `Record`s (rows read by attribute: `call.status`, `account.currency`). These
names are the whole of SQLAlchemy a service sees.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection

Transaction: TypeAlias = AsyncConnection
Record: TypeAlias = Row[Any]
