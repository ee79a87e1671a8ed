"""Outbound Twilio REST calls: meterd's only way to talk to Twilio's API.

A thin adapter around twilio-python's `Client` with its aiohttp-based `AsyncTwilioHttpClient`.
What this module adds to the library, each checked against twilio 9.13's source:

- `api_base_url`: the library hardcodes `https://api.twilio.com` on the `Api` domain
  (`ApiBase.__init__`) but reads `domain.base_url` afresh for every request
  (`Domain.absolute_url`), so setting `client.api.base_url` redirects every call made through
  `client.calls` / `client.conferences` (both resolve to `client.api.account.*`). `edge` and
  `region` are cleared after construction because `Client` reads `TWILIO_EDGE`/`TWILIO_REGION`
  from the environment and `ClientBase.get_hostname` would then rewrite the host.
- Authentication: given `username`/`password`, the library hands the async client an auth tuple
  that it turns into `aiohttp.BasicAuth`, deprecated since aiohttp 3.14 (a DeprecationWarning on
  every request). The same HTTP basic credentials are sent instead as a ready-made
  `Authorization` header through the library's `credential_provider` hook, which
  `ClientBase.request_async` checks first (and then passes no auth tuple).
- Timeouts: `AsyncTwilioHttpClient` stores its `timeout` argument but passes `timeout=None` to
  aiohttp for every request, which aiohttp reads as "no timeout at all". Each attempt is therefore
  bounded here with `asyncio.timeout`.
- Retries: the library retries only when built with `max_retries` (it then wraps its session in
  aiohttp-retry's `RetryClient`). It is built without, and aiohttp itself never re-sends a POST, so
  the loop below is the only retry: at most `attempts_max` attempts. A timed-out attempt may still
  have reached Twilio, so a retry can repeat it: a repeated hang-up does no more than the first
  (though Twilio may answer it with a 4xx), an announcement may play twice.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from twilio.auth_strategy.auth_strategy import AuthStrategy
from twilio.auth_strategy.auth_type import AuthType
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.credential.credential_provider import CredentialProvider
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from meterd.core.reconciliation import TwilioCall
from meterd.logs import get_logger

DEFAULT_API_BASE_URL = "https://api.twilio.com"
ATTEMPTS_MAX_LIMIT = 10
LIST_PAGE_SIZE = 100
_TOO_MANY_REQUESTS = 429


@dataclass(frozen=True)
class TwilioRestSettings:
    account_sid: str
    auth_token: str = field(repr=False)  # never in a repr, a log line or an error message
    api_base_url: str = DEFAULT_API_BASE_URL
    timeout_seconds: float = 10.0  # per attempt
    attempts_max: int = 3
    retry_backoff_seconds: float = 0.5  # before the 2nd attempt; doubled before each later one

    def __post_init__(self) -> None:
        if not self.account_sid.startswith("AC"):
            raise ValueError("account_sid must start with 'AC'")
        if not self.auth_token:
            raise ValueError("auth_token must not be empty")
        url = urlsplit(self.api_base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"api_base_url must be an http(s) URL, got {self.api_base_url!r}")
        if not self.timeout_seconds > 0:
            raise ValueError("timeout_seconds must be > 0")
        if not 1 <= self.attempts_max <= ATTEMPTS_MAX_LIMIT:
            raise ValueError(f"attempts_max must be between 1 and {ATTEMPTS_MAX_LIMIT}")
        if not self.retry_backoff_seconds >= 0:
            raise ValueError("retry_backoff_seconds must be >= 0")


class TwilioRestError(Exception):
    """A Twilio REST call failed for good: a non-retryable answer, or the last attempt failed.

    `status` is the HTTP status of the last answer, or None if there was none (connection error,
    timeout)."""

    def __init__(self, message: str, *, status: int | None, attempts: int) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class _BasicAuthHeader(AuthStrategy):  # type: ignore[misc]  # twilio ships no types: Any
    def __init__(self, username: str, password: str) -> None:
        super().__init__(AuthType.BASIC)
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._header = f"Basic {token}"

    def get_auth_string(self) -> str:
        return self._header

    def requires_authentication(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "<_BasicAuthHeader>"


class _BasicCredentials(CredentialProvider):  # type: ignore[misc]  # as _BasicAuthHeader
    """HTTP basic auth (account SID, auth token) as an Authorization header; see the module doc."""

    def __init__(self, username: str, password: str) -> None:
        super().__init__(AuthType.BASIC)
        self._strategy = _BasicAuthHeader(username, password)

    def to_auth_strategy(self) -> AuthStrategy:
        return self._strategy


@dataclass(frozen=True)
class _Failure:
    reason: str
    retryable: bool
    status: int | None = None
    twilio_code: int | None = None


def _classify(error: BaseException) -> _Failure | None:
    """How a failed attempt is treated; None for errors this adapter does not handle."""
    if isinstance(error, TwilioRestException | TwilioServiceException):
        status = int(error.status)
        retryable = status >= 500 or status == _TOO_MANY_REQUESTS
        return _Failure(f"http_{status}", retryable, status, error.code)
    # aiohttp's own timeouts subclass both ClientError and TimeoutError.
    if isinstance(error, TimeoutError):
        return _Failure("timeout", retryable=True)
    if isinstance(error, aiohttp.ClientError):
        return _Failure(f"connection_error:{type(error).__name__}", retryable=True)
    if isinstance(error, json.JSONDecodeError):
        # A 2xx whose body is not JSON: the request may have taken effect; do not repeat it.
        return _Failure("unparseable_response", retryable=False)
    return None


def _next_page_of(page: Any) -> Callable[[Client], Awaitable[Any]]:
    """The next page of a list (None after the last), fetched from `next_page_uri` by the
    library against the same base URL."""

    async def fetch(_client: Client) -> Any:
        return await page.next_page_async()

    return fetch


def _twilio_call(record: Any) -> TwilioCall:
    """One of the Calls list's records (twilio-python's CallInstance), as meterd compares it."""
    duration = getattr(record, "duration", None)
    return TwilioCall(
        sid=str(record.sid),
        start_time=record.start_time,
        duration_seconds=int(duration) if duration not in (None, "") else None,
        direction=str(record.direction or ""),
        status=str(record.status or ""),
        parent_call_sid=record.parent_call_sid or None,
    )


class TwilioRest:
    """Announce into a conference, hang up a call, place a callback, list the day's calls.
    Create it anywhere; the HTTP session is opened
    on first use (aiohttp needs a running loop). Call `close()` when done."""

    def __init__(self, settings: TwilioRestSettings) -> None:
        self._settings = settings
        self._client: Client | None = None
        self._http: AsyncTwilioHttpClient | None = None
        self._closed = False
        self._log = get_logger("meterd.twilio_rest")

    async def announce_to_conference(self, conference_sid: str, announce_url: str) -> None:
        """POST .../Conferences/{conference_sid}.json with AnnounceUrl and AnnounceMethod=POST."""
        await self._call(
            "announce_to_conference",
            {"conference_sid": conference_sid},
            lambda client: client.conferences(conference_sid).update_async(
                announce_url=announce_url, announce_method="POST"
            ),
        )

    async def hang_up(self, call_sid: str) -> None:
        """POST .../Calls/{call_sid}.json with Status=completed."""
        await self._call(
            "hang_up",
            {"call_sid": call_sid},
            lambda client: client.calls(call_sid).update_async(status="completed"),
        )

    async def place_call(self, *, to: str, from_: str, url: str, status_callback: str) -> str:
        """POST .../Calls.json: call `to` from `from_`; when answered, Twilio asks `url` (POST)
        for the call's TwiML and tells `status_callback` (POST) how the call ended. The new
        call's sid. One attempt only: Twilio's Calls create has no idempotency key, so a retry
        after a timeout could ring the customer twice (the caller records the outcome)."""
        record = await self._call(
            "place_call",
            {},
            lambda client: client.calls.create_async(
                to=to,
                from_=from_,
                url=url,
                method="POST",
                status_callback=status_callback,
                status_callback_method="POST",
                status_callback_event=["completed"],
            ),
            attempts_max=1,
        )
        return str(record.sid)

    async def list_calls(self, first_day: dt.date, last_day: dt.date) -> list[TwilioCall]:
        """GET .../Calls.json: every call that started on `first_day` to `last_day` (UTC dates,
        both included: Twilio's `StartTime>=` and `StartTime<=` take dates), page after page
        (`next_page_uri`), each page with the adapter's retries."""
        page = await self._call(
            "list_calls",
            {},
            lambda client: client.calls.page_async(
                start_time_after=first_day.isoformat(),
                start_time_before=last_day.isoformat(),
                page_size=LIST_PAGE_SIZE,
            ),
        )
        calls: list[TwilioCall] = []
        while page is not None:
            calls += [_twilio_call(record) for record in page]
            page = await self._call("list_calls", {}, _next_page_of(page))
        return calls

    async def close(self) -> None:
        """Close the HTTP session. Idempotent; the adapter cannot be used afterwards."""
        self._closed = True
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.close()

    def _twilio_client(self) -> Client:
        if self._closed:
            raise RuntimeError("TwilioRest is closed")
        if self._client is None:
            settings = self._settings
            # No max_retries: with it the library wraps the session in aiohttp-retry.
            http = AsyncTwilioHttpClient(timeout=settings.timeout_seconds, max_retries=None)
            client = Client(
                settings.account_sid,
                settings.auth_token,
                http_client=http,
                credential_provider=_BasicCredentials(settings.account_sid, settings.auth_token),
            )
            client.edge = None
            client.region = None
            client.api.base_url = settings.api_base_url
            self._http, self._client = http, client
        return self._client

    async def _call(
        self,
        operation: str,
        sids: dict[str, str],
        send: Callable[[Client], Awaitable[Any]],
        *,
        attempts_max: int | None = None,
    ) -> Any:
        client = self._twilio_client()
        settings = self._settings
        attempts_max = attempts_max or settings.attempts_max
        log = self._log.bind(operation=operation, **sids)
        backoff_seconds = settings.retry_backoff_seconds
        for attempt in range(1, attempts_max + 1):
            try:
                async with asyncio.timeout(settings.timeout_seconds):
                    result = await send(client)
            except Exception as error:
                failure = _classify(error)
                if failure is None:
                    raise
                will_retry = failure.retryable and attempt < attempts_max
                log.warning(
                    "twilio_rest_attempt_failed",
                    attempt=attempt,
                    attempts_max=attempts_max,
                    reason=failure.reason,
                    status=failure.status,
                    twilio_code=failure.twilio_code,
                    will_retry=will_retry,
                )
                if not will_retry:
                    raise TwilioRestError(
                        f"Twilio {operation} failed after {attempt} attempt(s): {failure.reason}",
                        status=failure.status,
                        attempts=attempt,
                    ) from error
                await asyncio.sleep(backoff_seconds)
                backoff_seconds *= 2
            else:
                if attempt > 1:
                    log.info("twilio_rest_succeeded_after_retry", attempt=attempt)
                return result
        return None
