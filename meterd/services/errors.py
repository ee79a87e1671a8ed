"""Operating errors raised by the services: bad input, not found, conflicts.

Each carries a short machine code and a human sentence; the web layer maps them to 4xx JSON
errors and the CLI prints them. A broken money invariant is not one of these (see
`meterd.core.ledger.LedgerError` and `InvariantBroken`).
"""

from __future__ import annotations


class ServiceError(Exception):
    code = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(ServiceError):
    code = "invalid_request"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class InvariantBroken(Exception):
    """A money invariant does not hold. Logged in full; the daemon then stops so systemd restarts
    it, because running on with a broken ledger is worse than not running."""
