"""The nightly usage report's pure core: no I/O, no clock. `meterd.services.usage` reads the
database and calls these. The decisions taken where docs/billing.md and issue 6 are silent (an
accountant's reading of "usage by day") are in the docstring of the module that implements each:

- `business_days`: what a business day is (local midnights, as UTC instants), and when it closes;
- `movements`: what a row counts, and which column each kind of ledger entry lands in;
- `reconciliation`: the rows, and the checks before anything is published (opening + movements
  = closing for every book of every account; the calls file adds up to the accounts file);
- `render`: the CSV and JSON files, the same bytes every time.

The names below are re-exported here, for those who use the report as a whole.
"""

from __future__ import annotations

from meterd.core.usage.business_days import (
    InvalidBusinessDay,
    business_day_of,
    day_bounds,
    last_closed_day,
    parse_business_day,
)
from meterd.core.usage.movements import Movements, PostingGroup, Role
from meterd.core.usage.reconciliation import (
    AccountUsage,
    BookBalance,
    CallsDoNotTie,
    CallUsage,
    ReconciliationError,
    RowStatus,
    TimeFacts,
    UsageDoesNotReconcile,
    reconcile,
    tie_calls,
)
from meterd.core.usage.render import (
    ACCOUNT_COLUMNS,
    CALL_COLUMNS,
    CALL_COLUMNS_BEFORE_DIRECTION,
    Cell,
    call_csv_header,
    call_csv_line,
    call_csv_lines,
    render_accounts_csv,
    render_accounts_json,
)

__all__ = [
    "ACCOUNT_COLUMNS",
    "CALL_COLUMNS",
    "CALL_COLUMNS_BEFORE_DIRECTION",
    "AccountUsage",
    "BookBalance",
    "CallUsage",
    "CallsDoNotTie",
    "Cell",
    "InvalidBusinessDay",
    "Movements",
    "PostingGroup",
    "ReconciliationError",
    "Role",
    "RowStatus",
    "TimeFacts",
    "UsageDoesNotReconcile",
    "business_day_of",
    "call_csv_header",
    "call_csv_line",
    "call_csv_lines",
    "day_bounds",
    "last_closed_day",
    "parse_business_day",
    "reconcile",
    "render_accounts_csv",
    "render_accounts_json",
    "tie_calls",
]
