"""A local stand-in for Twilio's REST API: records every request and answers like Twilio.

In-process (the test's own loop):

    async with RecordingTwilio() as twilio:
        settings = TwilioRestSettings(..., api_base_url=twilio.base_url)
        twilio.fail_next(2, status=500)
        ...
        assert twilio.requests[0].path == "/2010-04-01/Accounts/AC.../Calls/CA....json"

In a background thread (for tests that start the real daemon process):

    with RecordingTwilio.start_in_thread() as twilio:  # or call .stop() yourself
        ... twilio.base_url, twilio.requests, twilio.fail_next(...) ...

Faults queue up and are used one per request, in order: `fail_next` answers with an error status,
`drop_next` closes the connection without an answer, `delay_next` answers late (to trip client
timeouts; a delayed answer is cut short when the server stops).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import email.utils
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

API_VERSION = "2010-04-01"
_ACCOUNT = "/2010-04-01/Accounts/{account_sid}"
THREAD_START_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    form: list[tuple[str, str]]  # the x-www-form-urlencoded body, in order, repeats kept
    headers: Mapping[str, str]  # case-insensitive
    received_monotonic_seconds: float  # time.monotonic() on arrival

    @property
    def form_dict(self) -> dict[str, str]:
        return dict(self.form)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """(username, password) from the Authorization header, or None."""
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        username, _, password = base64.b64decode(encoded).decode().partition(":")
        return username, password


@dataclass(frozen=True)
class _Fault:
    status: int | None = None  # answer with this error status
    drop: bool = False  # close the connection without an answer
    delay_seconds: float = 0.0  # then answer normally


def _rfc2822_date(value: str) -> str:
    """The UTC date (YYYY-MM-DD) of an RFC 2822 time, as Twilio writes `start_time`."""
    return email.utils.parsedate_to_datetime(value).astimezone(dt.UTC).date().isoformat()


def listed_call(
    sid: str,
    start: dt.datetime,
    duration_seconds: int,
    *,
    direction: str = "inbound",
    status: str = "completed",
    parent_call_sid: str | None = None,
) -> dict[str, Any]:
    """A call resource as the Calls list answers it (the fields meterd reads, and a few more)."""
    return {
        "sid": sid,
        "account_sid": "AC" + "0" * 32,
        "parent_call_sid": parent_call_sid,
        "start_time": email.utils.format_datetime(start.astimezone(dt.UTC), usegmt=True),
        "end_time": email.utils.format_datetime(
            (start + dt.timedelta(seconds=duration_seconds)).astimezone(dt.UTC), usegmt=True
        ),
        "duration": str(duration_seconds),
        "direction": direction,
        "status": status,
        "from": "+14155550100",
        "to": "+14155550199",
        "api_version": "2010-04-01",
        "uri": f"/2010-04-01/Accounts/AC{'0' * 32}/Calls/{sid}.json",
    }


def _now_rfc2822() -> str:
    return format_datetime(datetime.now(UTC), usegmt=True).replace("GMT", "+0000")


def _error_body(status: int, message: str, code: int | None = None) -> dict[str, Any]:
    code = code or 20000 + status
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _call_resource(account_sid: str, sid: str, form: Mapping[str, str]) -> dict[str, Any]:
    now = _now_rfc2822()
    status = form.get("Status", "in-progress")
    ended = status in ("completed", "canceled")
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Calls/{sid}.json"
    return {
        "sid": sid,
        "account_sid": account_sid,
        "parent_call_sid": None,
        "date_created": now,
        "date_updated": now,
        "start_time": now,
        "end_time": now if ended else None,
        "duration": "0" if ended else None,
        "status": status,
        "direction": "inbound",
        "from": "+15005550006",
        "from_formatted": "(500) 555-0006",
        "to": "+15005550001",
        "to_formatted": "(500) 555-0001",
        "phone_number_sid": "PN" + "0" * 32,
        "answered_by": None,
        "forwarded_from": None,
        "caller_name": None,
        "group_sid": None,
        "price": None,
        "price_unit": "USD",
        "queue_time": "0",
        "trunk_sid": None,
        "api_version": API_VERSION,
        "annotation": None,
        "uri": uri,
        "subresource_uris": {
            "notifications": uri.replace(".json", "/Notifications.json"),
            "recordings": uri.replace(".json", "/Recordings.json"),
            "payments": uri.replace(".json", "/Payments.json"),
            "events": uri.replace(".json", "/Events.json"),
            "siprec": uri.replace(".json", "/Siprec.json"),
            "streams": uri.replace(".json", "/Streams.json"),
            "user_defined_message_subscriptions": uri.replace(
                ".json", "/UserDefinedMessageSubscriptions.json"
            ),
            "user_defined_messages": uri.replace(".json", "/UserDefinedMessages.json"),
        },
    }


def _conference_resource(account_sid: str, sid: str, form: Mapping[str, str]) -> dict[str, Any]:
    now = _now_rfc2822()
    status = form.get("Status", "in-progress")
    ended = status == "completed"
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Conferences/{sid}.json"
    return {
        "sid": sid,
        "account_sid": account_sid,
        "friendly_name": f"meterd-{sid}",
        "date_created": now,
        "date_updated": now,
        "status": status,
        "region": "us1",
        "api_version": API_VERSION,
        "reason_conference_ended": "conference-ended-via-api" if ended else None,
        "call_sid_ending_conference": None,
        "uri": uri,
        "subresource_uris": {
            "participants": uri.replace(".json", "/Participants.json"),
            "recordings": uri.replace(".json", "/Recordings.json"),
        },
    }


class RecordingTwilio:
    """An aiohttp app on 127.0.0.1 (a free port) that answers like Twilio's REST API."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # requests and faults are touched from two threads
        self._requests: list[RecordedRequest] = []
        self._faults: collections.deque[_Fault] = collections.deque()
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self.port: int | None = None
        # the Calls list: Twilio-shaped call resources, answered `list_page_size` to a page
        self.listed_calls: list[dict[str, Any]] = []
        self.list_page_size = 50
        # calls created (POST Calls.json), each answered with a new sid: (sid, form) in order
        self._created_calls: list[tuple[str, dict[str, str]]] = []

    # -- inspection and faults (safe from any thread) --

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("RecordingTwilio is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def created_calls(self) -> list[tuple[str, dict[str, str]]]:
        """Every call created so far: (the sid it was given, the request's form), in order."""
        with self._lock:
            return list(self._created_calls)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._created_calls.clear()

    def fail_next(self, count: int, *, status: int = 500) -> None:
        """Answer the next `count` requests with `status` and a Twilio-style error body."""
        self._add_faults(count, _Fault(status=status))

    def drop_next(self, count: int) -> None:
        """Close the connection of the next `count` requests without answering."""
        self._add_faults(count, _Fault(drop=True))

    def delay_next(self, count: int, *, seconds: float) -> None:
        """Hold the answer to the next `count` requests for `seconds`."""
        self._add_faults(count, _Fault(delay_seconds=seconds))

    def _add_faults(self, count: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * count)

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    # -- lifecycle --

    async def start(self) -> RecordingTwilio:
        app = web.Application(middlewares=[self._record_and_inject_faults])
        app.router.add_get(_ACCOUNT + "/Calls.json", self._calls_list)
        app.router.add_post(_ACCOUNT + "/Calls.json", self._create_call)
        app.router.add_route("*", _ACCOUNT + "/Calls/{sid}.json", self._call)
        app.router.add_route("*", _ACCOUNT + "/Conferences/{sid}.json", self._conference)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> RecordingTwilio:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @classmethod
    def start_in_thread(cls) -> ThreadedRecordingTwilio:
        """Run a new server on its own loop in a daemon thread; stop it with `.stop()`."""
        return ThreadedRecordingTwilio(cls())

    # -- handlers --

    @web.middleware
    async def _record_and_inject_faults(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        form = await request.post() if request.can_read_body else {}
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=list(request.query.items()),
            form=[(key, str(value)) for key, value in form.items()],
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            received_monotonic_seconds=time.monotonic(),
        )
        with self._lock:
            self._requests.append(recorded)
        fault = self._take_fault()
        if fault is not None and fault.drop:
            assert request.transport is not None
            request.transport.abort()
            raise web.HTTPInternalServerError()  # never written: the connection is gone
        if fault is not None and fault.status is not None:
            return web.json_response(
                _error_body(fault.status, "Injected failure"), status=fault.status
            )
        if fault is not None and fault.delay_seconds and self._stopping is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), fault.delay_seconds)
        return await handler(request)

    async def _call(self, request: web.Request) -> web.Response:
        return await self._resource(request, _call_resource)

    async def _create_call(self, request: web.Request) -> web.Response:
        """Twilio's Calls create: a new outbound-api call, queued, with a sid of its own."""
        form = {key: str(value) for key, value in (await request.post()).items()}
        sid = "CA" + uuid.uuid4().hex
        with self._lock:
            self._created_calls.append((sid, form))
        resource = _call_resource(request.match_info["account_sid"], sid, {"Status": "queued"})
        resource |= {"direction": "outbound-api", "to": form.get("To"), "from": form.get("From")}
        resource |= {"start_time": None, "duration": None}
        return web.json_response(resource, status=201)

    async def _calls_list(self, request: web.Request) -> web.Response:
        """Twilio's Calls list: `listed_calls` whose start date (UTC) is within StartTime> and
        StartTime< (dates, both included), a page at a time, `next_page_uri` to the next."""
        after = request.query.get("StartTime>", "0000-00-00")[:10]
        before = request.query.get("StartTime<", "9999-99-99")[:10]
        chosen = [
            call
            for call in self.listed_calls
            if after <= _rfc2822_date(call["start_time"]) <= before
        ]
        page = int(request.query.get("Page", "0"))
        size = int(request.query.get("PageSize", str(self.list_page_size)))
        size = min(size, self.list_page_size)
        records = chosen[page * size : (page + 1) * size]
        uri = request.path
        base_query = {k: v for k, v in request.query.items() if k not in ("Page", "PageToken")}
        more = (page + 1) * size < len(chosen)
        next_uri = (
            f"{uri}?{urlencode(base_query | {'Page': page + 1, 'PageToken': f'PT{page + 1}'})}"
            if more
            else None
        )
        return web.json_response(
            {
                "calls": records,
                "page": page,
                "page_size": size,
                "start": page * size,
                "end": page * size + len(records) - 1,
                "uri": str(request.rel_url),
                "first_page_uri": f"{uri}?{urlencode(base_query | {'Page': 0})}",
                "next_page_uri": next_uri,
                "previous_page_uri": None,
            }
        )

    async def _conference(self, request: web.Request) -> web.Response:
        return await self._resource(request, _conference_resource)

    async def _resource(
        self,
        request: web.Request,
        build: Callable[[str, str, Mapping[str, str]], dict[str, Any]],
    ) -> web.Response:
        if request.method not in ("GET", "POST"):
            return web.json_response(_error_body(405, "Method not allowed"), status=405)
        form = {key: str(value) for key, value in (await request.post()).items()}
        account_sid = request.match_info["account_sid"]
        return web.json_response(build(account_sid, request.match_info["sid"], form))

    async def _not_found(self, request: web.Request) -> web.Response:
        message = f"The requested resource {request.path} was not found"
        return web.json_response(_error_body(404, message), status=404)


class ThreadedRecordingTwilio:
    """A RecordingTwilio serving from its own event loop in a background thread."""

    def __init__(self, server: RecordingTwilio) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), name="recording-twilio", daemon=True
        )
        self._thread.start()
        if not self._started.wait(THREAD_START_TIMEOUT_SECONDS):
            raise RuntimeError("RecordingTwilio thread did not start")
        if self._error is not None:
            raise RuntimeError("RecordingTwilio thread failed to start") from self._error

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as error:
            self._error = error
            self._started.set()
            await self.server.close()
            return
        self._started.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.server.close()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.server.requests

    @property
    def created_calls(self) -> list[tuple[str, dict[str, str]]]:
        return self.server.created_calls

    def clear(self) -> None:
        self.server.clear()

    def fail_next(self, count: int, *, status: int = 500) -> None:
        self.server.fail_next(count, status=status)

    def drop_next(self, count: int) -> None:
        self.server.drop_next(count)

    def delay_next(self, count: int, *, seconds: float) -> None:
        self.server.delay_next(count, seconds=seconds)

    def stop(self) -> None:
        """Stop the server and wait for its thread. Idempotent."""
        if self._loop is not None and self._stop_event is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(THREAD_START_TIMEOUT_SECONDS)

    def __enter__(self) -> ThreadedRecordingTwilio:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
