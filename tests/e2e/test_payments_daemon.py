"""Card payments in the real daemon: a `kill -9` between the recorded charge and Stripe's
answer leaves exactly one charge, and a full card call logs no card data or secret."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
import time
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.integration.test_payments import pay_params
from tests.stripe_server import SECRET_KEY, LocalStripe

from .daemon import Daemon, run_cli
from .test_call_timelines import AGENTS_TOKEN, PUBLIC_BASE_URL, TWILIO_TOKEN, post_twilio
from .test_metering_daemon import balances, wait_for

PROXY_DELAY_SECONDS = 3.0


class DelayingProxy:
    """Forwards to localstripe, holding every new PaymentIntent for a while: the window in
    which the daemon has recorded the charge and is waiting for Stripe's answer."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DelayingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "POST" and request.path == "/v1/payment_intents":
            await asyncio.sleep(PROXY_DELAY_SECONDS)  # the caller may be dead by now
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type", "idempotency-key")
        }
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as answer:
            return web.Response(
                status=answer.status, body=await answer.read(), content_type="application/json"
            )

    def stop(self) -> None:
        async def close() -> None:
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def localstripe():
    server = LocalStripe().start()
    yield server
    server.stop()


def env_for(stripe_url: str, **extra: str) -> dict[str, str]:
    return {
        "METERD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "METERD_AGENTS_TOKEN": AGENTS_TOKEN,
        "METERD_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        "METERD_SETTLE_DELAY_SECONDS": "2",
        "METERD_STRIPE_SECRET_KEY": SECRET_KEY,
        "METERD_STRIPE_API_BASE_URL": stripe_url,
        "METERD_PAYMENT_RESOLVE_AFTER_SECONDS": "5",
        **extra,
    }


def intents_for(localstripe: LocalStripe, call_sid: str) -> list[dict]:
    request = urllib.request.Request(
        f"{localstripe.base_url}/v1/payment_intents?limit=100",
        headers={"Authorization": f"Bearer {SECRET_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        data = json.loads(response.read())["data"]
    return [
        i
        for i in data
        if (i.get("metadata") or {}).get("operation_key", "").startswith(f"call:{call_sid}:")
    ]


def setup_account(daemon: Daemon) -> None:
    status, body = daemon.admin(
        "POST",
        "/admin/accounts",
        {
            "account_id": "acme",
            "name": "Acme",
            "plan": "per_minute",
            "caller_ids": [CUSTOMER_NUMBER],
        },
    )
    assert status == 201, body


def test_kill_9_between_the_recorded_charge_and_stripes_answer(tmp_path, localstripe):
    localstripe.reset()
    proxy = DelayingProxy(localstripe.base_url).start()
    try:
        env = env_for(proxy.base_url)
        daemon = Daemon(tmp_path, env=env).start()
        setup_account(daemon)
        script = CallScript(1, dt.datetime.now(dt.UTC).replace(microsecond=0))
        assert "<Pay" in post_twilio(daemon, "/twilio/voice", script.voice())[1]

        def pay() -> None:
            with contextlib.suppress(OSError):  # the daemon is killed under this request
                post_twilio(daemon, "/twilio/pay?attempt=1", pay_params(script.call_sid))

        caller = threading.Thread(target=pay, daemon=True)
        caller.start()
        time.sleep(PROXY_DELAY_SECONDS / 2)  # recorded and sent; Stripe has not answered
        daemon.kill()
        caller.join(30)
        wait_for(
            lambda: len(intents_for(localstripe, script.call_sid)) == 1,
            "the charge to reach Stripe after all",
        )

        daemon = Daemon(tmp_path, env=env).start()
        try:
            # resolved from Stripe by its key: completed once, the block credited once
            wait_for(lambda: balances(daemon, "acme") == (30, 0), "the charge to be resolved")
            time.sleep(2)  # later resolution rounds change nothing
            assert balances(daemon, "acme") == (30, 0)
            assert len(intents_for(localstripe, script.call_sid)) == 1
            _, ledger = daemon.admin("GET", "/admin/ledger?account_id=acme")
            assert [t["kind"] for t in ledger["transactions"]] == ["card_block"]
            check = run_cli(["ledger", "check"], daemon.env, tmp_path)
            assert check.returncode == 0, check.stdout
        finally:
            assert daemon.stop() == 0
    finally:
        proxy.stop()


def test_a_full_card_call_logs_no_card_data_and_no_secret(tmp_path, localstripe):
    localstripe.reset()
    daemon = Daemon(tmp_path, env=env_for(localstripe.base_url)).start()
    try:
        setup_account(daemon)
        script = CallScript(
            2, dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=200)
        )
        post_twilio(daemon, "/twilio/voice", script.voice())
        post_twilio(
            daemon,
            "/twilio/pay-status",
            {
                **script.voice(),
                "For": "payment-card-number",
                "Attempt": "1",
                "PaymentCardNumber": "xxxx-xxxx-xxxx-4242",
            },
        )
        status, twiml = post_twilio(daemon, "/twilio/pay?attempt=1", pay_params(script.call_sid))
        assert status == 200 and "<Conference" in twiml
        script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", 120).end(120)
        for params in script.events:
            post_twilio(daemon, "/twilio/conference", params)
        for params in script.status_events:
            post_twilio(daemon, "/twilio/call-status", params)
        wait_for(
            lambda: daemon.admin("GET", f"/admin/calls/{script.call_sid}")[1]["settled_at"],
            "settlement",
        )
        assert balances(daemon, "acme") == (28, 0)
    finally:
        assert daemon.stop() == 0
    log = daemon.log()
    assert "card saved" in log and "payment succeeded" in log
    for secret in (SECRET_KEY, "pm_card_visa", "xxxx-xxxx-xxxx-4242", TWILIO_TOKEN, "1230"):
        assert secret not in log, secret
