"""Talking to meterd: Twilio's signed webhooks, the agents' tool and the admin API over HTTP,
and setting up the run's accounts and reading the prices in force."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from meterd.simulate.expectation import Prices
from meterd.simulate.scenarios import SimAccount
from meterd.simulate.wire import signed_form


@dataclass
class Stats:
    webhooks: Counter[str] = field(default_factory=Counter)  # by route
    duplicates: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # webhook seconds
    agent_requests: int = 0
    admin_requests: int = 0
    failures: int = 0


class Meterd:
    """The HTTP client side: Twilio's signed webhooks, the agents' tool, the admin API."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        public_base_url: str,
        *,
        twilio_auth_token: str,
        admin_token: str,
        agents_token: str,
        concurrency: int,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.public_base_url = public_base_url.rstrip("/")
        self.twilio_auth_token = twilio_auth_token
        self.admin_token = admin_token
        self.agents_token = agents_token
        self.stats = Stats()
        self._slots = asyncio.Semaphore(concurrency)

    async def twilio(self, path_qs: str, params: Mapping[str, str]) -> tuple[int, str]:
        """POST a signed form to `path_qs` (e.g. "/twilio/pin?attempt=1") as Twilio would."""
        body, headers = signed_form(self.public_base_url + path_qs, params, self.twilio_auth_token)
        headers |= {
            "I-Twilio-Idempotency-Token": hashlib.sha256(body).hexdigest()[:32],
            "User-Agent": "TwilioProxy/1.1",
        }
        route = path_qs.split("?", 1)[0]
        self.stats.webhooks[route] += 1
        for attempt in (1, 2):  # Twilio retries once when it cannot connect (rc=1)
            async with self._slots:
                started = time.perf_counter()
                try:
                    async with self.session.post(
                        self.base_url + path_qs, data=body, headers=headers
                    ) as response:
                        text = await response.text()
                except (TimeoutError, aiohttp.ClientConnectionError) as error:
                    if attempt == 2:
                        self.stats.failures += 1
                        return 0, f"{type(error).__name__}: {error}"
                    continue
                self.stats.latencies.append(time.perf_counter() - started)
                self.stats.statuses[response.status] += 1
                return response.status, text
        raise AssertionError("unreachable")

    async def json(
        self, method: str, path: str, body: Any = None, *, token: str
    ) -> tuple[int, Any]:
        if token == self.agents_token:
            self.stats.agent_requests += 1
        else:
            self.stats.admin_requests += 1
        async with self._slots:
            try:
                async with self.session.request(
                    method,
                    self.base_url + path,
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    text = await response.text()
                    try:
                        return response.status, json.loads(text) if text else None
                    except ValueError:
                        return response.status, text
            except (TimeoutError, aiohttp.ClientConnectionError) as error:
                self.stats.failures += 1
                return 0, f"{type(error).__name__}: {error}"

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.json(method, path, body, token=self.admin_token)

    async def agents(self, path: str, body: Any) -> tuple[int, Any]:
        return await self.json("POST", path, body, token=self.agents_token)


class SetupFailed(Exception):
    pass


async def set_up_accounts(
    meterd: Meterd, rng: random.Random, nonce: int, calls: int
) -> dict[str, SimAccount]:
    """Five accounts of this run. Funds are ample: calls are never refused for money, so each
    call's charges follow from its own timeline."""
    valid_until = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=365)).isoformat()
    licence = [{"product": "desktop", "kind": "license", "ump_until": valid_until}]
    specs = {
        # plan, products, minutes granted, deposit (minor units)
        "bank": ("per_minute", licence, 200 * calls + 100, 10_000),
        "deposit": ("per_minute", [], 0, 50_000 * calls + 100_000),
        "mixed": ("per_minute", licence, 0, 50_000 * calls + 100_000),
        "agreement": ("service_agreement", [], 0, 0),
        "incident": ("per_incident", [], 0, 10_000 * calls + 100_000),
    }
    accounts = {}
    for number, (kind, (plan, products, minutes, deposit)) in enumerate(specs.items()):
        account = SimAccount(
            kind,
            f"sim-{nonce:08x}-{kind}",
            plan,
            [f"+1555{nonce % 10**6:06d}{number}{k:02d}" for k in range(8)],
        )
        body: dict[str, Any] = {
            "account_id": account.account_id,
            "name": f"Simulated {kind} ({nonce:08x})",
            "plan": plan,
            "caller_ids": account.numbers,
            "products": products,
        }
        if plan == "service_agreement":
            body["valid_until"] = valid_until
        for _ in range(20):  # PINs are unique across all accounts: try another on a clash
            account.pin = f"{rng.randrange(10**7, 10**8)}"
            status, answer = await meterd.admin(
                "POST", "/admin/accounts", {**body, "pin": account.pin}
            )
            if status == 201 or status not in (409,) or "pin" not in str(answer).lower():
                break
        if status != 201:
            raise SetupFailed(f"POST /admin/accounts {kind}: {status} {answer}")
        account.currency = answer.get("currency", "USD")
        for path, amount in (
            ("minutes", {"minutes": minutes}),
            ("deposits", {"amount_minor": deposit}),
        ):
            if not any(amount.values()):
                continue
            status, answer = await meterd.admin(
                "POST",
                f"/admin/accounts/{account.account_id}/{path}",
                amount | {"reference": "simulator-stock"},
            )
            if status not in (200, 201):
                raise SetupFailed(f"{path} to {account.account_id}: {status} {answer}")
        status, view = await meterd.admin("GET", f"/admin/accounts/{account.account_id}")
        if status != 200:
            raise SetupFailed(f"GET /admin/accounts/{account.account_id}: {status} {view}")
        account.initial_bank, account.initial_deposit = view["bank_minutes"], view["deposit_minor"]
        accounts[kind] = account
    return accounts


async def read_prices(meterd: Meterd, currency: str, increment_seconds: int) -> Prices:
    """The per-minute rate and incident price in force now, from GET /admin/rates."""
    status, body = await meterd.admin("GET", "/admin/rates")
    if status != 200:
        raise SetupFailed(f"GET /admin/rates: {status} {body}")
    now = dt.datetime.now(dt.UTC)
    found: dict[str, tuple[dt.datetime, int]] = {}
    for rate in body["rates"]:
        if rate["currency"] not in ("*", currency):
            continue
        since = (
            dt.datetime.min.replace(tzinfo=dt.UTC)
            if rate["effective_from"] is None
            else dt.datetime.fromisoformat(rate["effective_from"])
        )
        if since <= now and (rate["kind"] not in found or since >= found[rate["kind"]][0]):
            found[rate["kind"]] = (since, rate["amount_minor"])
        if now - dt.timedelta(hours=2) < since:
            print(
                f"warning: a {rate['kind']} rate changes at {since.isoformat()}; calls near it "
                "may be priced otherwise than expected",
                file=sys.stderr,
            )
    return Prices(found["per_agent_minute"][1], found["incident"][1], increment_seconds)


def squash(value: Any) -> str:
    """An answer of meterd's on one short line."""
    return " ".join(str(value).split())[:240]
