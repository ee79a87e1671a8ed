"""POSTs an alert to the desk's URL, signed: the one place meterd calls the desk.

Headers: `Meterd-Event-Id` (the alert's unique id; the receiver drops a repeat by the body's
`id`, which the signature covers, not by this header, which it does not) and
`Meterd-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the alerts
secret>`. The receiver recomputes the HMAC over the timestamp and the raw body, compares in
constant time, and refuses a timestamp far from its clock (a replay)."""

from __future__ import annotations

import hashlib
import hmac
import time

import aiohttp

TIMEOUT_SECONDS = 10


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


class AlertNotDelivered(Exception):
    """The desk's URL did not take the alert (no answer, or not a 2xx)."""


class AlertSender:
    """One short-lived HTTP session per alert: alerts are rare, and nothing is left to close."""

    def __init__(self, url: str, secret: str) -> None:
        self._url = url
        self._secret = secret

    async def send(self, event_id: str, body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            "Meterd-Event-Id": event_id,
            "Meterd-Signature": signature(self._secret, int(time.time()), body),
        }
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self._url, data=body, headers=headers) as response,
            ):
                if not 200 <= response.status < 300:
                    raise AlertNotDelivered(f"{self._url} answered {response.status}")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise AlertNotDelivered(f"{self._url}: {error!r}"[:300]) from error
