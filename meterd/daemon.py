"""`meterd run`: open the database (migrating it), serve HTTP, stop gracefully on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from aiohttp import web

from meterd import sdnotify
from meterd.adapters.stripe_gateway import StripeGateway, StripeSettings
from meterd.adapters.twilio_rest import TwilioRest, TwilioRestSettings
from meterd.clock import Clock, system_clock
from meterd.config import Settings
from meterd.logs import AccessLogger, get_logger
from meterd.metrics import Metrics
from meterd.scheduler import STALE_SWEEP_INTERVAL_SECONDS, create_scheduler
from meterd.services.errors import InvariantBroken
from meterd.services.intake import WebhookIntake
from meterd.store.database import open_database
from meterd.store.outage import describe, is_unavailable
from meterd.web.app import SERVICES, create_app
from meterd.web.connections import CONNECTION_LIMITS
from meterd.web.ops import HEALTH, Health

log = get_logger("meterd.daemon")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_INVARIANT_BROKEN = 3


async def serve(settings: Settings, *, clock: Clock = system_clock) -> int:
    """Run until SIGTERM or SIGINT; return the exit status. A second signal exits at once."""
    for path in settings.generated_secret_files:
        log.warning("generated a token; read it from this file (mode 0600)", path=str(path))
    if settings.database_url.startswith("postgresql") and settings.secrets_from_state_dir:
        log.warning(
            "on a shared PostgreSQL every daemon must use the same tokens and PIN secret; "
            "these come from this machine's state directory: set them in the environment or "
            "as systemd credentials",
            secrets=sorted(settings.secrets_from_state_dir),
        )
    log.info(
        "starting",
        listen=f"{settings.listen_host}:{settings.listen_port}",
        database=_redacted(settings.database_url),
        state_dir=str(settings.state_dir),
    )
    try:
        database = await open_database(
            settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms
        )
    except Exception as error:
        if not is_unavailable(error):
            raise
        # One line, no traceback: under systemd a start is retried every 5 s until it answers.
        log.error(
            "cannot start: the database is unavailable",
            database=_redacted(settings.database_url),
            **describe(error),
        )
        return EXIT_STARTUP_FAILED
    stop = asyncio.Event()
    exit_status = EXIT_OK

    def on_invariant_broken(error: InvariantBroken) -> None:
        nonlocal exit_status
        exit_status = EXIT_INVARIANT_BROKEN
        stop.set()

    twilio_rest = _twilio_rest(settings)
    gateway = _gateway(settings)
    metrics = Metrics()  # one registry for the app's middleware and the scheduler's jobs
    app = create_app(
        settings,
        database,
        clock=clock,
        on_invariant_broken=on_invariant_broken,
        metrics=metrics,
        twilio_rest=twilio_rest,
        gateway=gateway,
    )
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        **server_limits(settings),
    )
    try:
        await runner.setup()
        assert runner.server is not None
        app[CONNECTION_LIMITS].install(runner.server)
        site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
        await site.start()
    except OSError as error:
        log.error("cannot listen", listen=settings.listen, error=str(error))
        await runner.cleanup()
        await database.close()
        return EXIT_STARTUP_FAILED

    services = app[SERVICES]
    scheduler = create_scheduler(on_invariant_broken, metrics, database.outage)
    app[HEALTH].attach_scheduler(scheduler)

    async def metering_tick() -> None:
        # Journaled callbacks first: no minute is posted from a timeline missing one of them.
        await services.intake.replay()
        if services.intake.journaling:
            return  # the database is still away; the next run tries again
        metrics.observe_tick(await services.metering.tick())

    tick_seconds = settings.tick_interval_seconds
    scheduler.every(tick_seconds, "metering-tick", metering_tick)
    scheduler.every(tick_seconds, "twilio-outbox", services.outbox.dispatch)
    scheduler.every(tick_seconds, "payments", services.payments.run)
    scheduler.every(
        STALE_SWEEP_INTERVAL_SECONDS, "close-stale-calls", services.ingest.close_stale_calls
    )
    # The nightly usage for finance; and at start, the days it missed while meterd was down.
    scheduler.cron(
        settings.usage_cron, settings.business_timezone, "usage-nightly", services.usage.catch_up
    )
    scheduler.once("usage-catch-up", services.usage.catch_up)
    scheduler.start()

    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(number: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: stopping at once", signal=signal.Signals(number).name)
            os._exit(128 + number)
        log.info("stopping", signal=signal.Signals(number).name)
        stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    log.info("ready", listen=f"{settings.listen_host}:{settings.listen_port}")
    # systemd (Type=notify): ready once database, migrations, scheduler and listener are up; the
    # watchdog then pings only while the health check passes; STOPPING=1 as a stop begins.
    notifier = sdnotify.Notifier.from_environment()
    notifier.ready(f"ready: listening on {settings.listen_host}:{settings.listen_port}")
    watchdog = asyncio.create_task(
        sdnotify.run_watchdog(
            notifier, _watchdog_check(app[HEALTH]), sdnotify.watchdog_interval_seconds()
        )
    )
    await stop.wait()
    notifier.stopping("stopping: letting the running tick and in-flight requests finish")
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    scheduler.pause()
    if not await scheduler.drain(settings.shutdown_timeout_seconds):
        log.warning("a scheduled job was still running at the stop timeout")
    await runner.cleanup()  # stops listening, finishes in-flight requests, runs cleanup hooks
    await _apply_journal_before_stopping(services.intake, settings.shutdown_timeout_seconds)
    scheduler.shutdown()
    if twilio_rest is not None:
        await twilio_rest.close()
    if gateway is not None:
        await gateway.close()
    await database.close()
    notifier.close()
    log.info("stopped", exit_status=exit_status)
    return exit_status


LINGERING_SECONDS_MAX = 2.0
"""After answering a request whose body was not all read (413, 408), aiohttp reads and drops what
the client still sends for at most this long before closing, so the client sees the answer
rather than a reset; aiohttp's default (10 s) would let a slow client hold the connection."""


def server_limits(settings: Settings) -> dict[str, float]:
    """aiohttp's own limits, from settings: idle (keep-alive) time, header count and length."""
    return {
        "lingering_time": LINGERING_SECONDS_MAX,
        "keepalive_timeout": settings.http_idle_timeout_seconds,
        "max_headers": settings.http_headers_max,
        "max_line_size": settings.http_header_line_bytes_max,
        "max_field_size": settings.http_header_line_bytes_max,
    }


async def _apply_journal_before_stopping(intake: WebhookIntake, timeout_seconds: float) -> None:
    """Callbacks journaled while the database was slow or away go to the database before the
    process ends, if it answers in time; else they wait in the journal for the next start."""
    await intake.wait_for_late_offers()
    if not intake.journaling:
        return
    try:
        async with asyncio.timeout(timeout_seconds):
            await intake.replay()
    except TimeoutError:
        pass
    if intake.journaling:
        log.warning(
            "stopping with callbacks still in the webhook journal; the next start applies them",
            entries=intake.journal_entries,
        )


def _watchdog_check(health: Health) -> sdnotify.HealthCheck:
    async def check(timeout_seconds: float) -> tuple[bool, str]:
        report = await health.check(timeout_seconds)
        return report.ok, report.summary

    return check


def _gateway(settings: Settings) -> StripeGateway | None:
    """The card gateway, if a Stripe secret key is configured."""
    if not settings.secret("stripe_secret_key"):
        log.warning(
            "no METERD_STRIPE_SECRET_KEY: per-minute callers without minutes or a "
            "deposit are told how to buy minutes, and card payments are off"
        )
        return None
    return StripeGateway(
        StripeSettings(
            secret_key=settings.secret("stripe_secret_key"),
            api_base_url=settings.stripe_api_base_url,
            timeout_seconds=settings.gateway_timeout_seconds,
        )
    )


def _twilio_rest(settings: Settings) -> TwilioRest | None:
    """The Twilio REST adapter, if an account sid and auth token are configured."""
    if not settings.twilio_account_sid or not settings.secret("twilio_auth_token"):
        log.warning(
            "no twilio_account_sid or auth token: announcements and hang-ups after "
            "funds run out will be recorded but not sent"
        )
        return None
    return TwilioRest(
        TwilioRestSettings(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.secret("twilio_auth_token"),
            api_base_url=settings.twilio_api_base_url,
        )
    )


def _redacted(url: str) -> str:
    """The database URL without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{credentials}{at}{host}"
