"""HTTP fuzzing (issue 12, acceptance 3): random requests to every route, signed and unsigned,
never get a 5xx, and a request without valid credentials stores nothing; the ledger check
passes afterwards. In-process here, on SQLite and PostgreSQL; `bench/fuzz.py` sends the same
kind of requests (50,000 by default) to a real `meterd run`.

What is sent (`fuzz_request`): random methods, request targets (every route of meterd/web/*.py,
variants of them and junk paths; raw query strings, bad percent-escapes included), headers
(right, wrong, absent and malformed `Authorization` and `X-Twilio-Signature`, content types,
content encodings, ranges, ...) and bodies (random bytes, random forms, JSON bodies shaped like
each admin/agents request with fields set to absurd values, and Twilio forms shaped like each
webhook with fields mutated: sids with a trailing newline, `Mon, 02 Dec 99999999999999999999
10:00:00 +0000`, huge numbers, unicode, NUL, empty values, repeated fields). Twilio forms are
either signed like Twilio does (over the app's public_base_url + the request target, with the
app's auth token) or not (no header, garbage, the wrong token, the wrong URL, a field added
after signing). Accounts and calls are made first, so signed events sometimes hit real calls.

What is checked:
- no answer has a status >= 500 (not even 503: the database is there all along);
- a request without valid credentials (no valid Twilio signature; no right bearer token for its
  prefix) changes nothing: every table is read before and after it and compared;
- every identifier made up for such a request carries `TAINT`, and afterwards no text column of
  any table contains it;
- `check_ledger` (what `meterd ledger check` runs) finds no breach.
The app is built once and hypothesis sends 1-4 requests per example (metering ticks between
some of them), so state builds up as in a real daemon; for that reason hypothesis does not
shrink (a shrunk example would not replay): the first failing request is reported as it was
sent, with what meterd logged.

    METERD_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/integration/test_http_fuzz.py -q
    METERD_FUZZ_KEEP_GOING=1 ...   # collect every failure instead of stopping at the first

The request generator is written against `Draw` so that the bench can drive it with
`random.Random` (`RandomDraw`) and this test with hypothesis (`HypothesisDraw`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import gzip
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, quote_plus, unquote, urlencode

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from sqlalchemy import String, Text, func, or_, select
from yarl import URL

from meterd.services.ledger_check import check_ledger
from meterd.services.twilio_fields import CALL_STATUSES, CONFERENCE_EVENTS, PAY_RESULTS, RULES
from meterd.store import usage_schema  # noqa: F401 - registers usage_runs on the metadata
from meterd.store.database import Database, open_database
from meterd.store.schema import metadata
from meterd.web.app import SERVICES
from tests.twilio_payloads import (
    call_status_params,
    conference_params,
    gather_params,
    rfc2822,
    sid,
    sign,
    voice_params,
)

from .twilio_app import ADMIN, AGENTS, PUBLIC_BASE_URL, TWILIO_TOKEN, ManualClock, build_app

EXAMPLES = int(os.environ.get("METERD_FUZZ_EXAMPLES", "400"))
KEEP_GOING = os.environ.get("METERD_FUZZ_KEEP_GOING", "") == "1"
FINANCE = "finance-token-0123456789abcdef"  # what twilio_app.build_app configures
START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
TAINT = "0bad0bad"
"""In every identifier made up for a request without valid credentials; never in any other."""
BODY_BYTES_MAX = 64 * 1024  # meterd's default request_body_bytes_max
ABSURD_TIMESTAMP = "Mon, 02 Dec 99999999999999999999 10:00:00 +0000"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

T = TypeVar("T")


# --- drawing values: hypothesis here, random.Random in the bench --------------------------------


class Draw(Protocol):
    def choice(self, options: Sequence[T]) -> T: ...
    def integer(self, low: int, high: int) -> int: ...
    def text(self, max_size: int, alphabet: str | None = None) -> str: ...
    def binary(self, max_size: int) -> bytes: ...


class HypothesisDraw:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def text(self, max_size: int, alphabet: str | None = None) -> str:
        chars = st.characters(codec="utf-8") if alphabet is None else st.sampled_from(alphabet)
        return self.data.draw(st.text(chars, max_size=max_size))

    def binary(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
_ODD_CHARS = (
    "\x00\x01\t\n\r\x0b\x1b\x7f\x85\xa0\xad\xe9\xff"
    "\u0130\u200b\u200e\u202e\u2028\ufeff\ufffd\U0001f600\U0010ffff"
)


class RandomDraw:
    """The same interface on `random.Random`: lengths are mostly short, characters mostly
    printable ASCII with control characters, NUL and unicode mixed in."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def _size(self, max_size: int) -> int:
        return min(max_size, int(self.rng.expovariate(1 / 12)))

    def text(self, max_size: int, alphabet: str | None = None) -> str:
        size = self._size(max_size)
        if alphabet is not None:
            return "".join(self.rng.choice(alphabet) for _ in range(size))
        out = []
        for _ in range(size):
            kind = self.rng.random()
            if kind < 0.7:
                out.append(self.rng.choice(_PRINTABLE))
            elif kind < 0.85:
                out.append(self.rng.choice(_ODD_CHARS))
            else:
                code = self.rng.randint(0x80, 0x10FFFF)
                out.append(chr(code) if not 0xD800 <= code <= 0xDFFF else "\ufffd")
        return "".join(out)

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self._size(max_size))


# --- the world the requests are made in ---------------------------------------------------------


@dataclass(frozen=True)
class SeededCall:
    n: int
    from_number: str

    @property
    def call_sid(self) -> str:
        return sid("CA", self.n)

    @property
    def conference_sid(self) -> str:
        return sid("CF", self.n)

    def leg(self, label: str) -> str:
        if label == "customer":
            return self.call_sid
        return sid("CA", self.n * 1000 + (LABELS.index(label) if label in LABELS else 99))


@dataclass
class World:
    """What the requests know about the app: its secrets, its URL, its clock, what exists."""

    now: Callable[[], dt.datetime]
    public_base_url: str = PUBLIC_BASE_URL
    twilio_token: str = TWILIO_TOKEN
    tokens: dict[str, str] = field(
        default_factory=lambda: {"/admin/": ADMIN, "/agents/": AGENTS, "/finance/": FINANCE}
    )
    account_ids: tuple[str, ...] = ("acme", "beta", "gamma", "delta")
    numbers: tuple[str, ...] = ("+14155550142", "+14155550143", "+14155550144")
    pins: tuple[str, ...] = ("246810", "13579")
    calls: tuple[SeededCall, ...] = (
        SeededCall(1, "+14155550142"),  # acme, connected
        SeededCall(2, "+14155550143"),  # beta (service agreement), connected
        SeededCall(3, "+15550000001"),  # unknown number: asked for a PIN
        SeededCall(4, "+14155550142"),  # acme, connected, then ended
        SeededCall(5, "+14155550145"),  # delta (per incident), connected
    )
    agents: tuple[str, ...] = ("alice", "bob")
    days: tuple[str, ...] = ("2026-11-19", "2026-11-20", "2026-11-21")


@dataclass
class FuzzRequest:
    method: str
    target: str  # the request target as on the request line: raw path, "?", raw query
    headers: list[tuple[str, str]]
    body: bytes
    credentialed: bool  # carries a valid Twilio signature or the right bearer token
    kind: str  # e.g. "twilio/conference valid", for the statistics

    def repro(self) -> str:
        body = self.body if len(self.body) <= 400 else self.body[:400] + b"...(truncated)"
        return (
            f"{self.method} {self.target}\n"
            + "".join(f"{name}: {value}\n" for name, value in self.headers)
            + f"body ({len(self.body)} bytes): {body!r}"
        )


# --- identifiers -----------------------------------------------------------------------------


def fresh_number(draw: Draw) -> int:
    return draw.integer(0, 16**24 - 1)


def fresh_sid(draw: Draw, prefix: str, tainted: bool) -> str:
    n = fresh_number(draw)
    if tainted:
        return f"{prefix}{TAINT}{n:024x}"
    return f"{prefix}{n:032x}".replace(TAINT, "00000000")


def pick_call_sid(draw: Draw, world: World, tainted: bool) -> str:
    call = draw.choice(world.calls)
    return draw.choice(
        [
            call.call_sid,
            call.call_sid,
            call.leg("agent:alice"),
            fresh_sid(draw, "CA", tainted),
            fresh_sid(draw, "CA", tainted),
        ]
    )


def pick_account_id(draw: Draw, world: World, tainted: bool) -> str:
    if draw.integer(0, 2):
        return draw.choice(world.account_ids)
    n = fresh_number(draw) % 100_000
    return f"unsigned-{TAINT}-{n}" if tainted else f"fz-{n}"


def pick_agent_id(draw: Draw, world: World, tainted: bool) -> str:
    if draw.integer(0, 2):
        return draw.choice(world.agents)
    n = fresh_number(draw) % 1000
    return f"u{TAINT}{n}" if tainted else f"agent{n}"


def pick_reference(draw: Draw, tainted: bool) -> str:
    n = fresh_number(draw) % 1_000_000
    return f"ref-{TAINT}-{n}" if tainted else f"ref-{n}"


def near_now(draw: Draw, world: World) -> dt.datetime:
    return world.now() + dt.timedelta(seconds=draw.integer(-900, 120))


# --- absurd values ------------------------------------------------------------------------------

NASTY_TEXT = (
    *("", " ", "\n", "\x00", "\r\n", "null", "true", "TRUE", "-1", "0", "01", "1.5", "1e3"),
    *("NaN", "Infinity", "99999999999999999999", str(2**63), str(-(2**63) - 1), "9" * 400),
    *("é", "\u202e", "\U0001f600", "\ufeff", "a" * 300, "x" * 5000, "%00", "%", "+", "&", "="),
    *("<Hangup/>", "]]>", "'; DROP TABLE calls; --", "agent:", "agent:" + "a" * 200),
    *("agent:a b", "customer ", "client:" + "x" * 300, "sip:a b", "+10000000000000000000", "+0"),
    *("anonymous", "2026-02-30", "2026-11-20T15:00:00", "9999-12-31T23:59:59+00:00"),
    *("99999-01-01", ABSURD_TIMESTAMP, "Mon, 02 Dec 2026 10:00:00 +9999"),
    *("Thu, 01 Jan 1970 00:00:00 +0000", "Sat, 31 Feb 2026 10:00:00 +0000"),
    *("Fri, 20 Nov 2026 15:00:00 GMT", "Tue, 1 Jan 2999 00:00:00 +0000"),
    *("Mon, 20 Nov 2026 15:00:00 +0000", "20 Nov 2999 23:59:59 -2359"),  # wrong weekday; -2359
)


def nasty_text(draw: Draw, world: World, tainted: bool) -> str:
    mode = draw.choice(["list", "list", "sid", "time", "number", "random", "known", "nul"])
    if mode == "list":
        return draw.choice(NASTY_TEXT)
    if mode == "nul":  # a real-looking value with a NUL in it (PostgreSQL refuses NUL in text)
        value = draw.choice([pick_call_sid(draw, world, tainted), *world.account_ids, "Acme"])
        cut = draw.integer(0, len(value))
        return value[:cut] + "\x00" + value[cut:]
    if mode == "sid":
        real = pick_call_sid(draw, world, tainted)
        return draw.choice(
            [
                real + "\n",
                real + " ",
                " " + real,
                real.lower(),
                real[:-1],
                real + "0",
                "CF" + real[2:],
                "CA" + "g" * 32,
                real + "\x00",
                fresh_sid(draw, draw.choice(["CA", "CF", "AC", "PA", "XX"]), tainted),
            ]
        )
    if mode == "time":
        at = near_now(draw, world) + dt.timedelta(days=draw.choice([0, 0, 1, -1, 400, -4000]))
        return rfc2822(at) if at.year >= 1900 else "Thu, 01 Jan 1970 00:00:00 +0000"
    if mode == "number":
        return str(draw.choice([-1, 0, 1, 2, 59, 60, 1000, 10**12 - 1, 10**12, 2**31, 2**64]))
    if mode == "known":
        return draw.choice([*world.numbers, *world.pins, *world.account_ids, "alice"])
    return draw.text(40)


def nasty_json(draw: Draw, world: World, tainted: bool, depth: int = 0) -> Any:
    mode = draw.choice(["scalar", "scalar", "scalar", "text", "list", "object"])
    if mode == "scalar":
        return draw.choice(
            [None, True, False, 0, -1, 1, 1.5, -0.0, 1e308, 10**30, -(10**30), 2**63, 2**64]
        )
    if mode == "text" or depth >= 2:
        return nasty_text(draw, world, tainted)
    if mode == "list":
        return [nasty_json(draw, world, tainted, depth + 1) for _ in range(draw.integer(0, 3))]
    return {
        draw.text(8): nasty_json(draw, world, tainted, depth + 1) for _ in range(draw.integer(0, 3))
    }


# --- Twilio webhooks ----------------------------------------------------------------------------

TWILIO_ROUTES = ("voice", "pin", "pay", "pay-status", "conference", "call-status", "fallback")
TWILIO_ROUTES += ("announcement", "voice", "conference", "conference", "call-status")
SIGNING = (
    *("valid", "valid", "valid", "valid", "valid_lower_header"),
    *("absent", "empty", "garbage", "wrong_token", "wrong_url", "tampered"),
)
LABELS = ("customer", "agent:alice", "agent:bob", "", "agent:carol", "supervisor")


def twilio_form(draw: Draw, world: World, route: str, tainted: bool) -> list[tuple[str, str]]:
    call = draw.choice(world.calls)
    call_sid = draw.choice([call.call_sid, call.call_sid, pick_call_sid(draw, world, tainted)])
    number = draw.choice([*world.numbers, call.from_number, "anonymous", "+15550000999"])
    if route == "voice":
        params = voice_params(call_sid, number)
    elif route == "pin":
        params = gather_params(
            call_sid, draw.choice([*world.pins, "1111", "", "1" * 32]), from_number=number
        )
    elif route == "pay":
        params = voice_params(
            call_sid, number, Result=draw.choice(sorted(PAY_RESULTS)), PaymentMethod="credit-card"
        )
        if draw.integer(0, 1):
            params |= {"PaymentToken": "pm_card_visa", "PaymentCardNumber": "xxxx-4242"}
    elif route == "pay-status":
        params = voice_params(
            call_sid,
            number,
            For="payment-card-number",
            ErrorType=draw.choice(["input-timeout", "invalid-card-number", ""]),
            Attempt=str(draw.integer(0, 3)),
        )
    elif route == "conference":
        event = draw.choice(sorted(CONFERENCE_EVENTS))
        label = draw.choice(LABELS)
        participant = call.leg(label) if draw.integer(0, 3) else pick_call_sid(draw, world, tainted)
        params = conference_params(
            call.conference_sid if draw.integer(0, 4) else fresh_sid(draw, "CF", tainted),
            call_sid,
            event,
            draw.choice([0, 1, 2, 3, 5, 8, 13, 100, draw.integer(0, 10**6)]),
            near_now(draw, world),
            call_sid=participant,
            label=label,
        )
    elif route == "call-status":
        params = call_status_params(
            call_sid,
            draw.choice(sorted(CALL_STATUSES)),
            draw.integer(0, 20),
            near_now(draw, world),
            from_number=number,
            duration_seconds=draw.choice([None, 0, 59, 61, 3600]),
        )
    elif route == "fallback":
        params = voice_params(
            call_sid,
            number,
            ErrorCode=draw.choice(["11200", "12100", "x"]),
            ErrorUrl=world.public_base_url + "/twilio/voice",
        )
    else:  # announcement: what Twilio posts when it fetches AnnounceUrl
        params = {"AccountSid": sid("AC", 0xACC), "ConferenceSid": call.conference_sid}
    pairs = list(params.items())
    for _ in range(draw.choice([0, 0, 0, 1, 1, 2, 3])):
        mutate_form(draw, world, pairs, tainted)
    return pairs


def mutate_form(draw: Draw, world: World, pairs: list[tuple[str, str]], tainted: bool) -> None:
    operation = draw.choice(["set", "set", "set", "drop", "repeat", "add"])
    if operation == "set" or not pairs:
        name = draw.choice([*(name for name, _ in pairs), *RULES])
        value = nasty_text(draw, world, tainted)
        for index, (existing, _) in enumerate(pairs):
            if existing == name:
                pairs[index] = (name, value)
                return
        pairs.append((name, value))
    elif operation == "drop":
        del pairs[draw.integer(0, len(pairs) - 1)]
    elif operation == "repeat":
        name, value = draw.choice(pairs)
        pairs.append((name, draw.choice([value, nasty_text(draw, world, tainted)])))
    else:
        pairs.append((draw.text(20), nasty_text(draw, world, tainted)))


def twilio_query(draw: Draw, route: str) -> str:
    if route in ("pin", "pay"):
        attempt = draw.choice(["1", "2", "3", "0", "99", "100", "-1", "1e1", "", "%31", "x"])
        return draw.choice(["", f"?attempt={attempt}", f"?attempt={attempt}&attempt=2"])
    if route == "announcement":
        message = draw.choice(["warn", "exhausted", "", "x", "warn%00", "%E9"])
        return draw.choice(["", f"?message={message}", f"?message={message}&message=warn"])
    return draw.choice(["", "", "?", "?x=1", raw_query(draw)])


def twilio_request(draw: Draw, world: World) -> FuzzRequest:
    route = draw.choice(TWILIO_ROUTES)
    signing = draw.choice(SIGNING)
    credentialed = signing in ("valid", "valid_lower_header")
    pairs = twilio_form(draw, world, route, tainted=not credentialed)
    target = as_sent(f"/twilio/{route}" + twilio_query(draw, route))
    signed_url = world.public_base_url + target
    body_mode = draw.choice(["form"] * 12 + ["bytes", "text", "json", "empty"])
    if body_mode == "form":
        body = urlencode(pairs, quote_via=draw.choice([quote_plus, quote])).encode("ascii")
    elif body_mode == "bytes":
        body = draw.binary(300)
    elif body_mode == "text":
        body = draw.text(300).encode("utf-8")
    elif body_mode == "json":
        body = json.dumps(dict(pairs)).encode()
    else:
        body = b""
    headers = [("Content-Type", draw.choice(TWILIO_CONTENT_TYPES))]
    if signing in ("valid", "valid_lower_header", "tampered"):
        signature = sign(signed_url, pairs, world.twilio_token)
    elif signing == "wrong_token":
        signature = sign(signed_url, pairs, "not-" + world.twilio_token)
    elif signing == "wrong_url":
        other = draw.choice(
            [
                "http://calls.example.com/meterd" + target,
                "https://calls.example.com" + target,
                "https://evil.example.com/meterd" + target,
                world.public_base_url
                + target.replace(route, "voice" if route != "voice" else "pin"),
            ]
        )
        signature = sign(other, pairs, world.twilio_token)
    elif signing == "garbage":
        signature = draw.choice(
            [
                draw.text(40, _PRINTABLE),
                base64.b64encode(draw.binary(20)).decode(),
                sign(signed_url, pairs, world.twilio_token)[:-2] + "==",
            ]
        )
    else:
        signature = ""
    if signing == "tampered":  # a field added after signing
        added = (f"Tampered{TAINT}", draw.choice(["1", fresh_sid(draw, "CA", True)]))
        body = (body + b"&" if body else b"") + urlencode([added]).encode()
    if signing != "absent":
        name = "x-twilio-signature" if signing == "valid_lower_header" else "X-Twilio-Signature"
        headers.append((name, signature))
    method = "POST" if draw.integer(0, 9) else draw.choice(METHODS)
    request = FuzzRequest(method, target, headers, body, credentialed, f"twilio/{route} {signing}")
    return with_extras(draw, world, request)


TWILIO_CONTENT_TYPES = (
    *[FORM] * 12,
    *(f"{FORM}; charset=utf-8", f"{FORM}; charset=latin-1", "APPLICATION/X-WWW-FORM-URLENCODED"),
    *(
        JSON,
        "text/plain",
        "multipart/form-data; boundary=xyz",
        "",
        f"{FORM};",
        f"{FORM}, text/plain",
    ),
    ";;;",
)


# --- the bearer-token routes --------------------------------------------------------------------

BEARER_ROUTES = (
    ("POST", "/admin/accounts", "account"),
    ("GET", "/admin/accounts", None),
    ("GET", "/admin/accounts/{account}", None),
    ("PATCH", "/admin/accounts/{account}", "patch"),
    ("POST", "/admin/accounts/{account}/deposits", "deposit"),
    ("POST", "/admin/accounts/{account}/minutes", "minutes"),
    ("GET", "/admin/calls/{call}", None),
    ("GET", "/admin/ledger", None),
    ("POST", "/admin/rates", "rate"),
    ("GET", "/admin/rates", None),
    ("POST", "/agents/research", "research"),
    ("POST", "/agents/waiver", "waiver"),
    ("POST", "/agents/incident-link", "incident"),
    ("GET", "/finance/usage/{day}.csv", None),
    ("GET", "/finance/usage/{day}.json", None),
    ("GET", "/finance/usage/{day}/calls.csv", None),
)
AUTHORIZATION = (
    *("right", "right", "right", "right", "right_lowercase", "absent", "empty", "scheme_only"),
    *("wrong", "other_prefix", "basic", "no_scheme", "twilio_token"),
)


def bearer_request(draw: Draw, world: World) -> FuzzRequest:
    method, template, body_kind = draw.choice(BEARER_ROUTES)
    prefix = "/" + template.split("/")[1] + "/"
    right = world.tokens[prefix]
    mode = draw.choice(AUTHORIZATION)
    others = [token for p, token in world.tokens.items() if p != prefix]
    header = {
        "right": f"Bearer {right}",
        "right_lowercase": f"bearer {right}",
        "absent": None,
        "empty": "",
        "scheme_only": "Bearer",
        "wrong": f"Bearer {draw.choice([right[:-1], right + 'x', draw.text(30, _PRINTABLE)])}",
        "other_prefix": f"Bearer {draw.choice(others)}",
        "basic": "Basic " + base64.b64encode(f"admin:{right}".encode()).decode(),
        "no_scheme": right,
        "twilio_token": f"Bearer {world.twilio_token}",
    }[mode]
    credentialed = mode in ("right", "right_lowercase", "basic", "no_scheme")
    tainted = not credentialed
    path = template.format(
        account=path_value(draw, world, pick_account_id(draw, world, tainted), tainted),
        call=path_value(draw, world, pick_call_sid(draw, world, tainted), tainted),
        day=path_value(draw, world, draw.choice(world.days), tainted),
    )
    query = ledger_query(draw, world, tainted) if template == "/admin/ledger" else ""
    if not query and not draw.integer(0, 4):
        query = raw_query(draw)
    headers = [] if header is None else [("Authorization", header)]
    body = b""
    if body_kind is not None or not draw.integer(0, 9):
        content_type, body = json_body(draw, world, body_kind, tainted)
        if content_type is not None:
            headers.append(("Content-Type", content_type))
    if not draw.integer(0, 9):
        method = draw.choice(METHODS)
    request = FuzzRequest(method, path + query, headers, body, credentialed, f"{template} {mode}")
    return with_extras(draw, world, request)


def path_value(draw: Draw, world: World, value: str, tainted: bool) -> str:
    """One path segment: usually the value as is, sometimes something absurd, percent-encoded
    (or, rarely, with a raw bad escape)."""
    mode = draw.choice(["plain"] * 6 + ["nasty", "nasty", "raw"])
    if mode == "plain":
        return quote(value, safe="")
    if mode == "nasty":
        return quote(nasty_text(draw, world, tainted), safe="")
    return draw.choice(["%zz", "%", "%ff%fe", "%2e%2e", "..", ".", "a%2Fb", "%00", "%E9", "~"])


def ledger_query(draw: Draw, world: World, tainted: bool) -> str:
    pairs = []
    for name in ("after_id", "limit", "since", "account_id", "call_sid"):
        if draw.integer(0, 2):
            continue
        if name in ("after_id", "limit"):
            value = draw.choice(
                ["0", "1", "5", "500", "501", "-1", "1e3", "x", "", str(2**63), "9" * 30]
            )
        elif name == "since":
            value = draw.choice([START.isoformat(), "2026-11-20", "yesterday", ABSURD_TIMESTAMP])
        elif name == "account_id":
            value = pick_account_id(draw, world, tainted)
        else:
            value = pick_call_sid(draw, world, tainted)
        if not draw.integer(0, 5):
            value = nasty_text(draw, world, tainted)
        pairs.append((name, value))
    return "?" + urlencode(pairs, quote_via=quote) if pairs else ""


def json_template(draw: Draw, world: World, kind: str | None, tainted: bool) -> dict[str, Any]:
    call_sid = pick_call_sid(draw, world, tainted)
    agent = pick_agent_id(draw, world, tainted)
    if kind == "account":
        body: dict[str, Any] = {
            "account_id": pick_account_id(draw, world, tainted),
            "name": "Fuzz " + draw.text(10, _PRINTABLE),
            "plan": draw.choice(["per_minute", "service_agreement", "per_incident", "gold"]),
            "caller_ids": [f"+1555{draw.integer(0, 9_999_999):07d}"],
            "products": [{"product": draw.choice(["desktop", "web"]), "kind": "license"}],
        }
        if draw.integer(0, 1):
            body["pin"] = f"{draw.integer(0, 99_999_999):08d}"
        if draw.integer(0, 1):
            body["valid_until"] = draw.choice(world.days)
            body["fallback_plan"] = "per_minute"
        return body
    if kind == "patch":
        return {"name": "Renamed", "caller_ids": [draw.choice(world.numbers)]}
    if kind == "deposit":
        return {"amount_minor": draw.integer(1, 10_000), "reference": pick_reference(draw, tainted)}
    if kind == "minutes":
        return {"minutes": draw.integer(1, 500), "reference": pick_reference(draw, tainted)}
    if kind == "rate":
        return {
            "kind": draw.choice(["per_agent_minute", "incident", "block", "x"]),
            "currency": "USD",
            "amount_minor": draw.integer(0, 10_000),
            "effective_from": (near_now(draw, world) + dt.timedelta(days=1)).isoformat(),
        }
    if kind == "research":
        if draw.integer(0, 1):
            return {
                "call_sid": call_sid,
                "agent_id": agent,
                "action": draw.choice(["start", "stop"]),
            }
        start = near_now(draw, world)
        return {
            "call_sid": call_sid,
            "agent_id": agent,
            "start": start.isoformat(),
            "end": (start + dt.timedelta(seconds=draw.integer(-60, 600))).isoformat(),
        }
    if kind == "waiver":
        return {
            "call_sid": call_sid,
            "agent_id": agent,
            "reason": draw.choice(["software_defect", "goodwill", "because"]),
        }
    if kind == "incident":
        return {"call_sid": call_sid, "incident_call_sid": pick_call_sid(draw, world, tainted)}
    return {}


def json_body(
    draw: Draw, world: World, kind: str | None, tainted: bool
) -> tuple[str | None, bytes]:
    """A content type (None: no header) and a body for a JSON route."""
    body = json_template(draw, world, kind, tainted)
    for _ in range(draw.choice([0, 0, 1, 1, 2])):
        operation = draw.choice(["set", "set", "drop", "add"])
        if operation == "set" and body:
            body[draw.choice(sorted(body))] = nasty_json(draw, world, tainted)
        elif operation == "drop" and body:
            del body[draw.choice(sorted(body))]
        else:
            body[draw.text(12)] = nasty_json(draw, world, tainted)
    mode = draw.choice(["json"] * 8 + ["raw", "value", "bytes", "deep", "form", "empty"])
    if mode == "json":
        raw = json.dumps(body, ensure_ascii=draw.choice([True, False])).encode("utf-8")
    elif mode == "raw":  # JSON-looking text JSON does not allow, or cut short
        text = json.dumps(body)
        raw = draw.choice(
            [
                text.replace("1", "NaN", 1),
                text.replace("1", "Infinity", 1),
                text[: max(1, len(text) // 2)],
                text + text,
                text.replace('"', "'"),
                '{"amount_minor": ' + "1" * 5000 + "}",
                text.encode("utf-16").decode("latin-1"),
            ]
        ).encode("utf-8", "surrogatepass")
    elif mode == "value":
        raw = json.dumps(nasty_json(draw, world, tainted)).encode()
    elif mode == "bytes":
        raw = draw.binary(300)
    elif mode == "deep":
        depth = draw.choice([100, 1000, 30_000])
        raw = ("[" * depth + "]" * depth).encode()
    elif mode == "form":
        raw = urlencode({k: str(v) for k, v in body.items()}).encode()
    else:
        raw = b""
    content_type = draw.choice(
        [JSON] * 6 + [f"{JSON}; charset=utf-8", "APPLICATION/JSON", FORM, "text/plain", None]
    )
    return content_type, raw


# --- open routes, and paths that are not routes -------------------------------------------------

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "FOO")
SEGMENTS = (
    *("admin", "agents", "finance", "twilio", "accounts", "calls", "ledger", "rates", "usage"),
    *("voice", "conference", "healthz", "metrics", "acme", "..", ".", "", "%2e%2e", "%2F", "%00"),
    *("%ff", "%zz", "%E9", "~", "a;b", "x" * 300),
)


def open_request(draw: Draw, world: World) -> FuzzRequest:
    path = draw.choice(["/healthz", "/metrics"])
    method = draw.choice(["GET", "GET", "GET", *METHODS])
    query = draw.choice(["", "", raw_query(draw)])
    request = FuzzRequest(method, path + query, [], draw.binary(100), False, f"{path}")
    return with_extras(draw, world, request)


def junk_request(draw: Draw, world: World) -> FuzzRequest:
    mode = draw.choice(["segments", "segments", "variant", "long"])
    if mode == "segments":
        path = "/" + "/".join(draw.choice(SEGMENTS) for _ in range(draw.integer(0, 5)))
    elif mode == "variant":
        real = (
            draw.choice(
                [f"/twilio/{route}" for route in TWILIO_ROUTES]
                + [template for _, template, _ in BEARER_ROUTES]
                + ["/healthz", "/metrics"]
            )
            .replace("{account}", "acme")
            .replace("{call}", sid("CA", 1))
            .replace("{day}", "x")
        )
        path = draw.choice(
            [
                real + "/",
                real.upper(),
                "/" + real,
                real.replace("/", "//", 1),
                real + "%00",
                real + "/..",
                "/x/.." + real,
                real.replace("/", "/%2e/", 1),
                real.replace("a", "%61", 1),
                real + ";x=1",
            ]
        )
    else:
        path = "/" + "a" * draw.choice([2000, 9000])
    headers: list[tuple[str, str]] = []
    credentialed = False
    if draw.integer(0, 1):  # sometimes the right credentials for wherever the path leads
        token = draw.choice([*world.tokens.values(), "nope"])
        headers.append(("Authorization", f"Bearer {token}"))
        credentialed = any(
            candidate.startswith(prefix) and token == world.tokens[prefix]
            for candidate in path_candidates(path)
            for prefix in world.tokens
        )
    tainted = not credentialed
    pairs = [("CallSid", fresh_sid(draw, "CA", tainted)), ("From", draw.choice(world.numbers))]
    if draw.integer(0, 1):
        headers.append(
            ("X-Twilio-Signature", sign(world.public_base_url + path, pairs, TWILIO_TOKEN))
        )
        credentialed = True  # a valid signature for this target (if it leads to a webhook)
    headers.append(("Content-Type", draw.choice([FORM, JSON, "text/plain"])))
    body = draw.choice([urlencode(pairs).encode(), draw.binary(200), b"{}"])
    query = draw.choice(["", raw_query(draw)])
    target = as_sent(path + query)
    request = FuzzRequest(draw.choice(METHODS), target, headers, body, credentialed, "junk")
    return with_extras(draw, world, request)


def as_sent(target: str) -> str:
    """`target` as the client sends it (a bare "?" at the end is dropped)."""
    return URL("http://localhost" + target, encoded=True).raw_path_qs


def path_candidates(path: str) -> set[str]:
    """The paths a server might route `path` (raw) as: as is, decoded, normalised."""
    decoded = unquote(path)
    out = {path, decoded, posixpath.normpath(decoded), posixpath.normpath(path)}
    with contextlib.suppress(ValueError):
        out.add(URL(path, encoded=True).path)
    return out


def raw_query(draw: Draw) -> str:
    """A query string, sometimes malformed (bad escapes, no '=', repeated names)."""
    parts = []
    for _ in range(draw.integer(1, 3)):
        name = draw.choice(["x", "attempt", "message", "limit", "", "a b", "%zz", "é"])
        value = draw.choice(["1", "", "%", "%zz", "%ff", "%00", "a+b", "=", draw.text(10)])
        parts.append(
            draw.choice(
                [
                    f"{quote(name, safe='%')}={quote(value, safe='%=')}",
                    quote(name, safe="%"),
                    f"{quote(name)}={quote(value)}",
                ]
            )
        )
    return "?" + "&".join(parts)


# --- headers every kind of request may get ------------------------------------------------------

EXTRA_HEADERS = (
    ("Accept", "*/*"),
    ("Accept", "application/xml"),
    ("Accept-Encoding", "gzip, br"),
    ("Content-Encoding", "gzip"),
    ("Content-Encoding", "deflate"),
    ("Content-Encoding", "br"),
    ("Content-Encoding", "identity"),
    ("Content-Encoding", "x-nonsense"),
    ("X-Forwarded-For", "203.0.113.7, 10.0.0.1"),
    ("X-Forwarded-Proto", "http"),
    ("X-Request-Id", "\u00e9t\u00e9"),
    ("Cookie", "session=1; x"),
    ("Origin", "null"),
    ("Range", "bytes=0-10"),
    ("Range", "bytes=999999-"),
    ("Range", "bytes=5-1"),
    ("Range", "lines=1-2"),
    ("If-None-Match", '"x"'),
    ("If-Modified-Since", ABSURD_TIMESTAMP),
    ("If-Unmodified-Since", ABSURD_TIMESTAMP),
    ("If-Range", ABSURD_TIMESTAMP),
    ("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT"),
    ("Expect", "200-ok"),
    ("Connection", "close"),
    ("Authorization", "Bearer"),
)


def with_extras(draw: Draw, world: World, request: FuzzRequest) -> FuzzRequest:
    """Adds a few headers, and sometimes compresses the body or makes it too large."""
    for _ in range(draw.choice([0, 0, 0, 0, 1, 2])):
        name, value = draw.choice(EXTRA_HEADERS)
        if name == "Authorization" and any(n == name for n, _ in request.headers):
            continue  # a second Authorization: which one counts is not the point here
        request.headers.append((name, value))
    if not draw.integer(0, 9):
        request.headers.append(("X-" + draw.text(12, "abcxyz-_0123"), draw.text(30, _PRINTABLE)))
    encodings = [v for n, v in request.headers if n == "Content-Encoding"]
    if encodings and draw.integer(0, 1):  # a body that really is compressed
        if encodings[0] == "gzip":
            request.body = gzip.compress(request.body)
        elif encodings[0] == "deflate":
            request.body = zlib.compress(request.body)
    if not draw.integer(0, 49):
        request.body = request.body + b"a" * (BODY_BYTES_MAX + 1 - len(request.body))
    return request


def fuzz_request(draw: Draw, world: World) -> FuzzRequest:
    family = draw.choice(["twilio"] * 5 + ["bearer"] * 4 + ["open", "junk"])
    if family == "twilio":
        return twilio_request(draw, world)
    if family == "bearer":
        return bearer_request(draw, world)
    if family == "open":
        return open_request(draw, world)
    return junk_request(draw, world)


# --- seeding: accounts and calls for the fuzzed events to land on -------------------------------


def _signed(world: World, path: str, params: dict[str, str]) -> FuzzRequest:
    pairs = list(params.items())
    return FuzzRequest(
        "POST",
        path,
        [
            ("Content-Type", FORM),
            ("X-Twilio-Signature", sign(world.public_base_url + path, pairs, world.twilio_token)),
        ],
        urlencode(pairs).encode(),
        True,
        "seed",
    )


def _admin(world: World, method: str, path: str, body: Any) -> FuzzRequest:
    return FuzzRequest(
        method,
        path,
        [("Authorization", f"Bearer {world.tokens['/admin/']}"), ("Content-Type", JSON)],
        json.dumps(body).encode(),
        True,
        "seed",
    )


def seed_requests(world: World) -> list[tuple[FuzzRequest, int]]:
    """(request, expected status): four accounts, five calls (connected, one waiting for its
    PIN, one ended)."""
    out = []
    accounts = [
        {
            "account_id": "acme",
            "name": "Acme",
            "plan": "per_minute",
            "caller_ids": ["+14155550142"],
            "products": [{"product": "desktop", "kind": "license"}],
        },
        {
            "account_id": "beta",
            "name": "Beta",
            "plan": "service_agreement",
            "caller_ids": ["+14155550143"],
            "pin": "246810",
        },
        {"account_id": "gamma", "name": "Gamma", "plan": "per_minute", "pin": "13579"},
        {
            "account_id": "delta",
            "name": "Delta",
            "plan": "per_incident",
            "caller_ids": ["+14155550145"],
        },
    ]
    for body in accounts:
        out.append((_admin(world, "POST", "/admin/accounts", body), 201))
    for account in ("acme", "delta"):
        grant = {"minutes": 100_000, "reference": f"seed-{account}"}
        out.append((_admin(world, "POST", f"/admin/accounts/{account}/minutes", grant), 201))
        deposit = {"amount_minor": 1_000_000, "reference": f"seed-deposit-{account}"}
        out.append((_admin(world, "POST", f"/admin/accounts/{account}/deposits", deposit), 201))
    now = world.now()
    for call in world.calls:
        out.append(
            (_signed(world, "/twilio/voice", voice_params(call.call_sid, call.from_number)), 200)
        )
        if call.n == 3:
            continue  # stays at the PIN menu
        for sequence, (event, label) in enumerate(
            [
                ("conference-start", ""),
                ("participant-join", "customer"),
                ("participant-join", "agent:alice"),
            ]
        ):
            params = conference_params(
                call.conference_sid,
                call.call_sid,
                event,
                sequence,
                now,
                call_sid=call.leg(label) if label else "",
                label=label,
            )
            out.append((_signed(world, "/twilio/conference", params), 204))
    ended = world.calls[3]
    params = call_status_params(ended.call_sid, "completed", 9, now, duration_seconds=30)
    out.append((_signed(world, "/twilio/call-status", params), 204))
    return out


# --- sending, and what the database holds -------------------------------------------------------


async def send(
    session: aiohttp.ClientSession, base_url: str, request: FuzzRequest
) -> tuple[int, str]:
    """The answer's status and text; status 0 with the error if no answer came."""
    url = URL(base_url.rstrip("/") + request.target, encoded=True)
    headers = CIMultiDict(request.headers)
    skip = () if "Content-Type" in headers else ("Content-Type",)
    try:
        async with session.request(
            request.method,
            url,
            data=request.body,
            headers=headers,
            skip_auto_headers=skip,
            allow_redirects=False,
        ) as response:
            return response.status, (await response.read()).decode("utf-8", "replace")
    except aiohttp.ClientResponseError as error:  # an answer the client could not take in
        return error.status, f"{type(error).__name__}: {error}"
    except (aiohttp.ClientError, TimeoutError) as error:
        return 0, f"{type(error).__name__}: {error}"
    except ValueError as error:  # the client refuses to send it (a header it thinks unsafe)
        return -1, f"{type(error).__name__}: {error}"


def text_columns(table: Any) -> list[Any]:
    return [c for c in table.columns if isinstance(c.type, String | Text)]


async def rows_containing(database: Database, needle: str) -> dict[str, int]:
    """How many rows of each table have `needle` in a text column (tables with none left out)."""
    found = {}
    async with database.read() as connection:
        for table in metadata.sorted_tables:
            columns = text_columns(table)
            if not columns:
                continue
            count = await connection.scalar(
                select(func.count())
                .select_from(table)
                .where(or_(*(column.contains(needle, autoescape=True) for column in columns)))
            )
            if count:
                found[table.name] = count
    return found


async def snapshot(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    out = {}
    async with database.read() as connection:
        for table in metadata.sorted_tables:
            rows = await connection.execute(select(table).order_by(*table.primary_key.columns))
            out[table.name] = [tuple(row) for row in rows]
    return out


def differences(before: dict[str, list[Any]], after: dict[str, list[Any]]) -> list[str]:
    out = []
    for name in before:
        if before[name] != after[name]:
            gone = [row for row in before[name] if row not in after[name]]
            new = [row for row in after[name] if row not in before[name]]
            out.append(f"{name}: rows removed or changed {gone[:3]}, added or changed {new[:3]}")
    return out


# --- the test -----------------------------------------------------------------------------------


class _ErrorLog:
    """Error lines (with their traceback) logged while a request was handled: meterd's own
    (structlog) and aiohttp's (logging)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def processor(self, _logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if method in ("error", "critical", "exception"):
            trace = traceback.format_exc() if event.get("exc_info") else ""
            self.lines.append(f"{event.get('event')} {event.get('path', '')}\n{trace}")
        return event

    def handler(self) -> logging.Handler:
        log = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                trace = (
                    "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
                )
                log.lines.append(f"{record.name}: {record.getMessage()}\n{trace}")

        return Handler(logging.ERROR)


class Fuzzer:
    """Sends requests to the in-process app and judges each answer."""

    def __init__(self, client: TestClient, database: Database, errors: _ErrorLog) -> None:
        self.client = client
        self.database = database
        self.errors = errors
        self.base_url = str(client.make_url("/"))
        self.problems: dict[str, list[str]] = {}  # kind of failure -> its reports
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.last: dict[str, list[Any]] | None = None  # the database after the last request

    def problem(self, key: str, text: str) -> None:
        self.problems.setdefault(key, []).append(text)
        if not KEEP_GOING:
            raise AssertionError(text)

    def report(self) -> str:
        return (
            f"{sum(map(len, self.problems.values()))} problems of {len(self.problems)} kinds:"
            + "".join(
                f"\n\n=== {len(texts)} x {key}\n{texts[0]}" for key, texts in self.problems.items()
            )
        )

    def cause(self) -> str:
        """The last exception line logged (its class and message), or ''."""
        for line in reversed("\n".join(self.errors.lines).splitlines()):
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Warning)\b", line):
                return line[:120]
        return ""

    async def exchange(self, request: FuzzRequest) -> None:
        before = None
        if not request.credentialed:
            before = self.last if self.last is not None else await snapshot(self.database)
        self.errors.lines.clear()
        status, text = await send(self.client.session, self.base_url, request)
        family = request.kind.split(" ")[0] if request.kind != "junk" else "junk"
        self.statuses[(family + (" credentialed" if request.credentialed else ""), status)] += 1
        if status >= 500 or status == 0:
            self.problem(
                f"{status} {family} {self.cause() or text[:80]}",
                f"{'no answer' if status == 0 else status} for\n{request.repro()}\n"
                f"answer: {text[:500]}\nlogged:\n" + "\n".join(self.errors.lines),
            )
        self.last = None
        if before is not None:
            after = await snapshot(self.database)
            changed = differences(before, after)
            if changed:
                self.problem(
                    f"stored {request.kind} {', '.join(c.split(':')[0] for c in changed)}",
                    f"a request without valid credentials changed the database ({status}):\n"
                    f"{request.repro()}\n" + "\n".join(changed),
                )
            self.last = after

    async def tick(self, clock: ManualClock, seconds: int) -> None:
        clock.advance(seconds)
        await self.client.app[SERVICES].metering.tick()
        self.last = None


async def _start(
    database_url: str, workdir: Path, state_dir: Path, clock: ManualClock
) -> tuple[Database, TestClient]:
    if database_url.startswith("sqlite"):  # on tmpfs when there is one: fsync is not under test
        database_url = f"sqlite+aiosqlite:///{workdir}/fuzz.sqlite3"
    database = await open_database(database_url)
    try:
        # a connection per request: a request that makes the server close its connection
        # must not fail the next one
        client = TestClient(
            TestServer(build_app(database, state_dir, clock)),
            connector=aiohttp.TCPConnector(force_close=True),
        )
        await client.start_server()
    except BaseException:
        await database.close()
        raise
    return database, client


def test_fuzzed_requests_get_no_5xx_and_unauthenticated_ones_store_nothing(database_url, tmp_path):
    workdir = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    errors = _ErrorLog()
    handler = errors.handler()
    structlog_config = structlog.get_config()
    structlog.configure(
        processors=[errors.processor, *structlog_config["processors"]],
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
    )
    logging.getLogger("aiohttp").addHandler(handler)
    started = time.monotonic()
    try:
        with asyncio.Runner() as runner:
            clock = ManualClock(START)
            database, client = runner.run(_start(database_url, workdir, tmp_path, clock))
            try:
                world = World(now=clock)
                fuzzer = Fuzzer(client, database, errors)
                runner.run(_seed(fuzzer, world))

                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    # no shrinking: state builds up across examples, so a shrunk example would
                    # not replay; the failing request is reported as it was sent
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[
                        HealthCheck.too_slow,
                        HealthCheck.data_too_large,
                        HealthCheck.filter_too_much,
                        HealthCheck.large_base_example,
                    ],
                )
                @given(data=st.data())
                def fuzz(data: st.DataObject) -> None:
                    draw = HypothesisDraw(data)
                    for _ in range(draw.integer(1, 4)):
                        if not draw.integer(0, 14):
                            runner.run(fuzzer.tick(clock, draw.integer(1, 90)))
                        else:
                            runner.run(fuzzer.exchange(fuzz_request(draw, world)))

                fuzz()
                tainted = runner.run(rows_containing(database, TAINT))
                control = runner.run(rows_containing(database, world.calls[0].call_sid))
                ledger = runner.run(check_ledger(database))
            finally:
                runner.run(client.close())
                runner.run(database.close())
    finally:
        logging.getLogger("aiohttp").removeHandler(handler)
        structlog.configure(**structlog_config)
        shutil.rmtree(workdir, ignore_errors=True)
    summary = ", ".join(
        f"{kind} {status}: {n}" for (kind, status), n in sorted(fuzzer.statuses.items())
    )
    elapsed = time.monotonic() - started
    print(f"\n{sum(fuzzer.statuses.values())} requests in {elapsed:.1f} s: {summary}")
    if tainted:
        fuzzer.problems["rows from requests without valid credentials"] = [str(tainted)]
    if not ledger.ok:
        fuzzer.problems["ledger check"] = [str(ledger.breaches)]
    assert not fuzzer.problems, fuzzer.report()
    assert control.get("calls") and control.get("webhook_events")  # the search does find rows
    if EXAMPLES >= 200:  # the fuzzing reached past the checks, and the checks refused
        answered = Counter()
        for (kind, status), n in fuzzer.statuses.items():
            answered[kind, status // 100] += n
        assert (
            answered["twilio/conference credentialed", 2] + answered["twilio/voice credentialed", 2]
        )
        # uncredentialed requests were refused, on Twilio's routes and on the admin API (any
        # admin route: which of them a run draws uncredentialed is chance)
        admin_refused = sum(
            n
            for (kind, family), n in answered.items()
            if kind.startswith("/admin/") and family == 4
        )
        assert answered["twilio/conference", 4] and admin_refused


async def _seed(fuzzer: Fuzzer, world: World) -> None:
    for request, expected in seed_requests(world):
        status, text = await send(fuzzer.client.session, fuzzer.base_url, request)
        assert status == expected, f"{request.repro()}\n{status} {text}"
    await fuzzer.client.app[SERVICES].usage.build(START.date() - dt.timedelta(days=1))


# --- the bugs this fuzzing found, one request each ---------------------------------------------
# Each of these failed when the fuzzing first ran (commit c928ba8) and passes since the fix
# (commit 5a9612d); the fuzz test above sends such requests among others.


@pytest.fixture
async def fuzz_client(aiohttp_client, database, tmp_path):
    return await aiohttp_client(build_app(database, tmp_path, ManualClock(START)))


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/twilio/voice", {"X-Twilio-Signature": "x"}),
        ("/admin/rates", {"Authorization": f"Bearer {ADMIN}"}),
        ("/agents/research", {"Authorization": f"Bearer {AGENTS}"}),
        ("/healthz", {}),  # a route that never reads its body
    ],
    ids=["twilio", "admin", "agents", "healthz"],
)
async def test_bug_a_body_that_does_not_decode_as_its_content_encoding_is_4xx_not_500(
    fuzz_client, path, headers
):
    """Found by this fuzzing (meterd/web/app.py error_middleware; meterd/web/connections.py
    reads the body): `Content-Encoding: gzip` over a body that is not gzip makes aiohttp raise
    `aiohttp.web_protocol.RequestPayloadError` ("400, message: Can not decode content-encoding:
    gzip") from `request.read()`; the error middleware does not know it and answers 500
    internal_error with a traceback in the log (aiohttp then logs "Unhandled exception" while
    draining the body and closes the connection). Now 400, as for any body meterd cannot
    read."""
    response = await fuzz_client.post(
        path,
        data=b"CallSid=CA00000000000000000000000000000001",
        headers={"Content-Type": FORM, "Content-Encoding": "gzip", **headers},
    )
    assert response.status < 500, await response.text()


@pytest.mark.parametrize("header", ["If-Modified-Since", "If-Unmodified-Since", "If-Range"])
async def test_bug_a_published_usage_file_asked_for_with_an_absurd_date_gets_an_answer(
    fuzz_client, header
):
    """Found by this fuzzing (meterd/web/finance.py serves the day with web.FileResponse):
    aiohttp parses If-Modified-Since / If-Unmodified-Since / If-Range while preparing the file
    response, after meterd's middlewares, and `parse_http_date` raises OverflowError ("Python
    int too large to convert to C long") on a year like 99999999999999999999: aiohttp logs
    "Unhandled exception" and drops the connection without any answer. Now an answer below 500
    (meterd refuses the unreadable date with 400)."""
    day = START.date() - dt.timedelta(days=1)
    await fuzz_client.app[SERVICES].usage.build(day)
    extra = {"Range": "bytes=0-9"} if header == "If-Range" else {}
    try:
        response = await fuzz_client.get(
            f"/finance/usage/{day}.csv",
            headers={"Authorization": f"Bearer {FINANCE}", header: ABSURD_TIMESTAMP, **extra},
        )
    except aiohttp.ServerDisconnectedError:
        pytest.fail(f"no answer: the server closed the connection ({header}: {ABSURD_TIMESTAMP})")
    assert response.status < 500, await response.text()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/calls/CA%00", None),
        ("GET", "/admin/accounts/ac%00me", None),
        ("GET", "/admin/ledger?call_sid=CA%00", None),
        ("GET", "/admin/ledger?account_id=ac%00me", None),
        ("POST", "/admin/accounts", {"account_id": "a1", "name": "A\x00", "plan": "per_minute"}),
        ("POST", "/agents/research", {"call_sid": "CA\x00", "agent_id": "al", "action": "start"}),
        ("POST", "/agents/waiver", {"call_sid": "CA\x00", "agent_id": "al", "reason": "goodwill"}),
        ("POST", "/agents/incident-link", {"call_sid": "CA\x00", "incident_call_sid": "CA1"}),
    ],
    ids=lambda value: value if isinstance(value, str) else "body",
)
async def test_bug_a_nul_character_in_a_value_is_4xx_not_500(fuzz_client, method, path, body):
    """Found by this fuzzing, on PostgreSQL (SQLite was fine): a NUL character in a value
    meterd puts in a query (a path's account id or call sid, a ledger filter, an agent's call_sid,
    an account's name) reaches asyncpg, which refuses it: CharacterNotInRepertoireError "invalid
    byte sequence for encoding "UTF8": 0x00", answered 500 internal_error. Now 400 (404 would do
    for a lookup), like any other malformed value."""
    response = await fuzz_client.request(
        method,
        URL(path, encoded=True),
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {ADMIN if path.startswith('/admin/') else AGENTS}",
            "Content-Type": JSON,
        },
    )
    assert response.status < 500, await response.text()


@pytest.mark.parametrize("after_id", [str(2**63), "9" * 30])
async def test_bug_a_ledger_page_after_an_id_past_64_bits_is_4xx_not_500(fuzz_client, after_id):
    """Found by this fuzzing, on SQLite and PostgreSQL (meterd/web/admin.py get_ledger):
    `after_id` is any whole number, and one past 2**63 - 1 reaches the database driver, which
    refuses it: OverflowError "Python int too large to convert to SQLite INTEGER" (SQLite),
    asyncpg DataError "invalid input for query argument $1: 9223372036854775808 (value out of
    int64 range)" (PostgreSQL); answered 500 internal_error. Now 400."""
    response = await fuzz_client.get(
        f"/admin/ledger?after_id={after_id}", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert response.status < 500, await response.text()
