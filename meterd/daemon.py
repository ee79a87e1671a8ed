"""`meterd run`: open the database (migrating it), serve HTTP, stop gracefully on a signal.

What the daemon starts is one aiohttp cleanup context per step on the root application
(`Lifecycle`), started in this order as the runner sets up and stopped in the reverse order as it
cleans up, so a failure at any step stops exactly what had started before it:

1. the database (meterd.bootstrap), closed last;
2. the adapters: the Twilio REST client the outbox sends with, the Stripe gateway;
3. the services (meterd.bootstrap.build_services), given to the app with its health check, and
   the writer that group-commits Twilio's callbacks; stopping ends the writer, then applies the
   webhook journal to the database, if it answers;
4. the scheduler and its jobs; stopping pauses it and lets a running job finish;
5. the systemd notifier and its watchdog.

Then the listener; READY=1 once it listens. A stop (SIGTERM, SIGINT, a broken money invariant)
says STOPPING=1, stops the watchdog and pauses the scheduler, then the runner's cleanup stops
listening, lets in-flight requests finish and runs the steps' cleanups."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from meterd import bootstrap, sdnotify
from meterd.clock import Clock, system_clock
from meterd.config import Settings
from meterd.logs import AccessLogger, get_logger
from meterd.metrics import Metrics
from meterd.scheduler import (
    ALERT_WATCH_SECONDS,
    STALE_SWEEP_INTERVAL_SECONDS,
    Scheduler,
    create_scheduler,
)
from meterd.services.errors import InvariantBroken
from meterd.services.intake import WebhookIntake
from meterd.store.database import Database
from meterd.store.outage import describe, is_unavailable
from meterd.web.app import build_app, install_services
from meterd.web.health import Health
from meterd.web.keys import CONNECTION_LIMITS, HEALTH, SERVICES

log = get_logger("meterd.daemon")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_INVARIANT_BROKEN = 3


class Lifecycle:
    """The daemon's steps (see the module's docstring), each an async generator for
    `app.cleanup_ctx`: what is before its `yield` starts the step, what is after stops it."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()  # one registry for the app's middleware and the scheduler's jobs
        self.stop = asyncio.Event()
        self.exit_status = EXIT_OK
        self._database: Database | None = None
        self._adapters: bootstrap.Adapters | None = None
        self._scheduler: Scheduler | None = None
        self._notifier: sdnotify.Notifier | None = None
        self._watchdog: asyncio.Task[None] | None = None

    def install(self, app: web.Application) -> None:
        app.cleanup_ctx.extend(
            [self.database, self.adapters, self.services, self.scheduler, self.notifier]
        )

    def on_invariant_broken(self, error: InvariantBroken) -> None:
        self.exit_status = EXIT_INVARIANT_BROKEN
        self.stop.set()

    async def database(self, app: web.Application) -> AsyncIterator[None]:
        async with bootstrap.database(self.settings) as database:
            self._database = database
            yield

    async def adapters(self, app: web.Application) -> AsyncIterator[None]:
        async with bootstrap.adapters(self.settings) as adapters:
            self._adapters = adapters
            yield

    async def services(self, app: web.Application) -> AsyncIterator[None]:
        assert self._database is not None and self._adapters is not None
        services = bootstrap.build_services(
            self.settings,
            self._database,
            clock=self.clock,
            metrics=self.metrics,
            twilio_rest=self._adapters.twilio_rest,
            gateway=self._adapters.gateway,
            on_invariant_broken=self.on_invariant_broken,
        )
        services.intake.start()  # the writer that group-commits the callbacks
        health = install_services(app, services)
        try:
            yield
        finally:
            # Requests and scheduled jobs have finished: the writer ends, then what they
            # journaled goes to the database now, if it answers; then no health probe may
            # still be waiting on it.
            await services.intake.stop(self.settings.shutdown_timeout_seconds)
            await _apply_journal_before_stopping(
                services.intake, self.settings.shutdown_timeout_seconds
            )
            await health.close()

    async def scheduler(self, app: web.Application) -> AsyncIterator[None]:
        services, metrics = app[SERVICES], self.metrics
        scheduler = create_scheduler(self.on_invariant_broken, metrics, services.database.outage)

        async def nightly() -> None:
            # the usage first; then Twilio's records are compared with the day it closed
            await services.usage.catch_up()
            if services.reconciliation.enabled:
                for day in await services.reconciliation.nightly():
                    metrics.observe_reconciliation(await services.reconciliation.report(day))

        async def metering_tick() -> None:
            # Journaled callbacks first: no minute is posted from a timeline missing one of them.
            await services.intake.replay()
            if services.intake.journaling:
                return  # the database is still away; the next run tries again
            metrics.observe_tick(await services.metering.tick())

        tick_seconds = self.settings.tick_interval_seconds
        # on the second: a minute is due at a whole second, and is posted just after it
        scheduler.every(tick_seconds, "metering-tick", metering_tick, on_the_second=True)
        scheduler.every(tick_seconds, "twilio-outbox", services.outbox.dispatch)
        scheduler.every(tick_seconds, "payments", services.payments.run)
        scheduler.every(ALERT_WATCH_SECONDS, "auto-top-up", services.auto_top_up.run)
        if services.alerts.enabled:
            scheduler.every(ALERT_WATCH_SECONDS, "alerts-watch", services.alerts.watch_balances)
            scheduler.every(tick_seconds, "alerts-deliver", services.alerts.deliver)
        scheduler.every(
            STALE_SWEEP_INTERVAL_SECONDS, "close-stale-calls", services.ingest.close_stale_calls
        )
        # The nightly usage for finance; and at start, the days it missed while meterd was down.
        scheduler.cron(
            self.settings.usage_cron,
            self.settings.business_timezone,
            "usage-nightly",
            nightly,
        )
        scheduler.once("usage-catch-up", services.usage.catch_up)
        app[HEALTH].attach_scheduler(scheduler)
        scheduler.start()
        self._scheduler = scheduler
        try:
            yield
        finally:
            scheduler.pause()
            if not await scheduler.drain(self.settings.shutdown_timeout_seconds):
                log.warning("a scheduled job was still running at the stop timeout")
            scheduler.shutdown()

    async def notifier(self, app: web.Application) -> AsyncIterator[None]:
        self._notifier = sdnotify.Notifier.from_environment()
        try:
            yield
        finally:
            await self._stop_watchdog()
            self._notifier.close()

    def ready(self, health: Health) -> None:
        """Listening: tell systemd (Type=notify), and from now on ping its watchdog while the
        health check passes."""
        assert self._notifier is not None
        listen = f"{self.settings.listen_host}:{self.settings.listen_port}"
        self._notifier.ready(f"ready: listening on {listen}")
        self._watchdog = asyncio.create_task(
            sdnotify.run_watchdog(
                self._notifier, _watchdog_check(health), sdnotify.watchdog_interval_seconds()
            )
        )

    async def stopping(self) -> None:
        """A stop begins: STOPPING=1, no more watchdog pings, no new scheduled runs (a running
        one finishes as the scheduler's step stops)."""
        if self._notifier is not None:
            self._notifier.stopping(
                "stopping: letting the running tick and in-flight requests finish"
            )
        await self._stop_watchdog()
        if self._scheduler is not None:
            self._scheduler.pause()

    async def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog


async def serve(settings: Settings, *, clock: Clock = system_clock) -> int:
    """Run until SIGTERM or SIGINT; return the exit status. A second signal exits at once."""
    _log_start(settings)
    lifecycle = Lifecycle(settings, clock)
    app = build_app(settings, lifecycle.metrics)
    lifecycle.install(app)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        **server_limits(settings),
    )
    if not await _start(runner, settings):
        return EXIT_STARTUP_FAILED
    _stop_on_signals(lifecycle)
    log.info("ready", listen=f"{settings.listen_host}:{settings.listen_port}")
    lifecycle.ready(app[HEALTH])
    await lifecycle.stop.wait()
    await lifecycle.stopping()
    # Stops listening, lets in-flight requests finish, then stops the lifecycle's steps in
    # reverse: notifier, scheduler (the running job finishes), services, adapters, database.
    await runner.cleanup()
    log.info("stopped", exit_status=lifecycle.exit_status)
    return lifecycle.exit_status


def _log_start(settings: Settings) -> None:
    """The start line, after warnings about where the secrets came from."""
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


async def _start(runner: web.AppRunner, settings: Settings) -> bool:
    """Start the lifecycle's steps, then listen; False (logged, what started stopped again) if
    the database is unavailable or the address cannot be listened on."""
    try:
        await runner.setup()  # every step of the lifecycle, in order
    except Exception as error:
        await runner.cleanup()  # the steps that started, in reverse
        if not is_unavailable(error):
            raise
        # One line, no traceback: under systemd a start is retried every 5 s until it answers.
        log.error(
            "cannot start: the database is unavailable",
            database=_redacted(settings.database_url),
            **describe(error),
        )
        return False
    try:
        assert runner.server is not None
        runner.app[CONNECTION_LIMITS].install(runner.server)
        site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
        await site.start()
    except OSError as error:
        log.error("cannot listen", listen=settings.listen, error=str(error))
        await runner.cleanup()
        return False
    return True


def _stop_on_signals(lifecycle: Lifecycle) -> None:
    """SIGTERM or SIGINT stops the daemon gracefully; a second signal exits at once."""
    signals_seen = 0

    def on_signal(number: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: stopping at once", signal=signal.Signals(number).name)
            os._exit(128 + number)
        log.info("stopping", signal=signal.Signals(number).name)
        lifecycle.stop.set()

    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)


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


def _watchdog_check(health: Health) -> sdnotify.HealthCheck:
    async def check(timeout_seconds: float) -> tuple[bool, str]:
        report = await health.check(timeout_seconds)
        return report.ok, report.summary

    return check


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


def _redacted(url: str) -> str:
    """The database URL without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{credentials}{at}{host}"
