"""Twilio's words for a call leg's fate that meterd acts on."""

from __future__ import annotations

# The call-status callbacks that end a leg (twilio.md: `CallStatus` of a status callback).
TERMINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
