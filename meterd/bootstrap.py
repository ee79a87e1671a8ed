"""One bootstrap: the database, the adapters and every service meterd runs with, built from
settings in one place. The web app (`meterd.web.app.create_app`), the daemon (`meterd.daemon`)
and every CLI command (`meterd.cli`) get what they use from here, so they cannot drift apart.

- `open_database` / `database`: the database, migrated to the newest revision;
- `open_adapters` / `adapters`: the Twilio REST client (the outbox's announcements and hang-ups)
  and the Stripe gateway, each None (with one warning) when it is not configured;
- `build_services`: every service, wired together, as the web app and the scheduler use them;
  each service is built by one function from the settings it reads (`payment_service`,
  `funding_authority`, `metering_service`, ...);
- `account_service`, `usage_service`: the two the offline CLI commands use, built by the same
  functions `build_services` uses (the CLI builds no more than it needs: the webhook intake
  would load, and may trim, the daemon's live journal).

Nothing here imports meterd.web or starts anything: no listener, no scheduler, no task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from meterd.adapters.alert_sender import AlertSender
from meterd.adapters.stripe_gateway import PaymentGateway, StripeGateway, StripeSettings
from meterd.adapters.twilio_rest import TwilioRest, TwilioRestSettings
from meterd.clock import Clock
from meterd.config import CardMode, OnExhausted, Settings
from meterd.logs import get_logger
from meterd.metrics import Metrics
from meterd.services.accounts import AccountService, AccountSettings
from meterd.services.alerts import AlertService
from meterd.services.answering import AnsweringService, AnsweringSettings
from meterd.services.auto_top_up import AutoTopUp
from meterd.services.call_view import CallViewService
from meterd.services.callbacks import CallbackService, CallbackSettings, CallPlacer
from meterd.services.desk import DeskService
from meterd.services.errors import InvariantBroken
from meterd.services.funding import FundingAuthority
from meterd.services.incidents import IncidentService
from meterd.services.ingest import IngestService
from meterd.services.ingest_writer import IngestWriter
from meterd.services.intake import WebhookIntake
from meterd.services.metering import MeteringService, MeteringSettings
from meterd.services.minute_posting import MinutePoster
from meterd.services.outbox import OutboxDispatcher, TwilioCalls
from meterd.services.payments import PaymentService, PaymentSettings
from meterd.services.rates import RateBook, RateKind
from meterd.services.reconciliation import CallLister, ReconciliationService
from meterd.services.research import ResearchService
from meterd.services.settlement import SettlementService
from meterd.services.statements import StatementService
from meterd.services.usage import UsageService
from meterd.services.waivers import WaiverService
from meterd.store.database import Database
from meterd.store.database import open_database as _open_database
from meterd.store.journal import WebhookJournal

log = get_logger("meterd.bootstrap")


@dataclass
class Services:
    """Everything a handler or a scheduled job may use, built once by `build_services`."""

    settings: Settings
    database: Database
    clock: Clock
    accounts: AccountService
    answering: AnsweringService
    callbacks: CallbackService  # calls the desk places to customers, metered as any call
    ingest: IngestService
    intake: WebhookIntake  # conference and call-status callbacks: database, else journal
    research: ResearchService
    call_view: CallViewService
    desk: DeskService  # the desk's live page
    alerts: AlertService  # alerts POSTed to the desk's URL
    auto_top_up: AutoTopUp  # blocks bought when an account's bank falls below its threshold
    metering: MeteringService
    waivers: WaiverService
    incidents: IncidentService
    rates: RateBook
    outbox: OutboxDispatcher
    payments: PaymentService
    usage: UsageService  # the nightly usage for finance
    statements: StatementService  # an account's statement, from the nightly usage
    reconciliation: ReconciliationService  # the nightly check against Twilio's call records
    on_invariant_broken: Callable[[InvariantBroken], None]


# --- the database ---------------------------------------------------------------------------


async def open_database(settings: Settings) -> Database:
    """The configured database, migrated to the newest revision; the caller closes it."""
    return await _open_database(
        settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms
    )


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Database]:
    """`open_database`, closed on the way out."""
    opened = await open_database(settings)
    try:
        yield opened
    finally:
        await opened.close()


# --- the adapters ---------------------------------------------------------------------------


@dataclass
class Adapters:
    """The outside world: each None when its settings are missing."""

    twilio_rest: TwilioRest | None
    gateway: StripeGateway | None

    async def close(self) -> None:
        """Close both, the gateway even if closing the Twilio client fails."""
        try:
            if self.twilio_rest is not None:
                await self.twilio_rest.close()
        finally:
            if self.gateway is not None:
                await self.gateway.close()


def open_adapters(settings: Settings) -> Adapters:
    return Adapters(twilio_rest=twilio_rest(settings), gateway=payment_gateway(settings))


@asynccontextmanager
async def adapters(settings: Settings) -> AsyncIterator[Adapters]:
    """`open_adapters`, closed on the way out."""
    opened = open_adapters(settings)
    try:
        yield opened
    finally:
        await opened.close()


def payment_gateway(settings: Settings) -> StripeGateway | None:
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


def twilio_rest(settings: Settings) -> TwilioRest | None:
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


# --- the services ---------------------------------------------------------------------------


def account_service(settings: Settings, database: Database, clock: Clock) -> AccountService:
    return AccountService(database, AccountSettings.of(settings), clock)


def usage_service(settings: Settings, database: Database, clock: Clock) -> UsageService:
    return UsageService.from_settings(database, settings, clock)


def rate_book(settings: Settings, database: Database, clock: Clock) -> RateBook:
    return RateBook(
        database,
        clock,
        {
            RateKind.PER_AGENT_MINUTE: settings.rate_per_agent_minute_minor,
            RateKind.INCIDENT: settings.incident_price_minor,
            RateKind.BLOCK: settings.block_price_minor,
        },
    )


def build_services(
    settings: Settings,
    database: Database,
    *,
    clock: Clock,
    metrics: Metrics,
    twilio_rest: TwilioCalls | None = None,
    gateway: PaymentGateway | None = None,
    on_invariant_broken: Callable[[InvariantBroken], None] | None = None,
) -> Services:
    """Every service, from settings, database, clock and adapters (None: not configured).
    `metrics` receives the webhook journal's gauges; `on_invariant_broken` is told of a broken
    money invariant (default: raise it)."""
    rates = rate_book(settings, database, clock)
    alerts = alert_service(settings, database, clock)
    payments = payment_service(settings, database, clock, rates, gateway, alerts)
    funding = funding_authority(settings, rates, payments)
    ingest = ingest_service(settings, database, clock)
    usage = usage_service(settings, database, clock)
    accounts = account_service(settings, database, clock)
    call_view = call_view_service(settings, database, clock)
    answering = answering_service(settings, database, clock, payments, funding)
    return Services(
        settings=settings,
        database=database,
        clock=clock,
        accounts=accounts,
        answering=answering,
        callbacks=CallbackService(
            database,
            clock,
            funding,
            answering,
            twilio_rest if isinstance(twilio_rest, CallPlacer) else None,
            CallbackSettings(
                public_base_url=settings.public_base_url,
                from_number=settings.callback_from_number,
            ),
        ),
        ingest=ingest,
        intake=webhook_intake(settings, database, clock, ingest, metrics),
        research=ResearchService(
            database, clock, research_max_minutes=settings.research_max_minutes
        ),
        call_view=call_view,
        desk=DeskService(call_view, accounts, clock),
        alerts=alerts,
        auto_top_up=auto_top_up(settings, database, clock, rates, gateway),
        metering=metering_service(settings, database, clock, rates, payments, funding, alerts),
        waivers=WaiverService(
            database,
            clock,
            payments,
            reasons=list(settings.waiver_reasons),
            waiver_days=settings.waiver_days,
            alerts=alerts,
        ),
        payments=payments,
        incidents=IncidentService(database, clock, link_days=settings.incident_link_days),
        rates=rates,
        outbox=OutboxDispatcher(database, twilio_rest, clock),
        usage=usage,
        statements=StatementService(database, usage),
        reconciliation=reconciliation_service(
            settings, database, clock, twilio_rest, usage, alerts
        ),
        on_invariant_broken=on_invariant_broken or _raise,
    )


def call_view_service(settings: Settings, database: Database, clock: Clock) -> CallViewService:
    """A call as a person reads it, and the open and ended calls (the desk's page too)."""
    return CallViewService(
        database,
        clock,
        increment_seconds=settings.increment_seconds,
        research_max_minutes=settings.research_max_minutes,
    )


def auto_top_up(
    settings: Settings,
    database: Database,
    clock: Clock,
    rates: RateBook,
    gateway: PaymentGateway | None,
) -> AutoTopUp:
    """Blocks bought when an account's bank falls below its threshold (block card mode)."""
    return AutoTopUp(
        database,
        clock,
        rates,
        enabled=settings.card_mode == CardMode.BLOCK and gateway is not None,
        block_minutes=settings.block_minutes,
        per_day=settings.auto_top_up_per_day,
    )


def reconciliation_service(
    settings: Settings,
    database: Database,
    clock: Clock,
    twilio_rest: TwilioCalls | None,
    usage: UsageService,
    alerts: AlertService,
) -> ReconciliationService:
    """The nightly check against Twilio's call records (off without a Twilio account)."""
    lister = twilio_rest if isinstance(twilio_rest, CallLister) else None
    return ReconciliationService(
        database,
        clock,
        lister,
        usage,
        alerts,
        tolerance_seconds=settings.reconcile_tolerance_seconds,
    )


def alert_service(settings: Settings, database: Database, clock: Clock) -> AlertService:
    """Alerts to `alerts_url`, signed with the alerts secret (no URL: alerts are off)."""
    sender = (
        AlertSender(settings.alerts_url, settings.secret("alerts_secret"))
        if settings.alerts_url
        else None
    )
    return AlertService(
        database,
        clock,
        sender,
        bank_minutes_below=settings.alert_bank_minutes_below,
        deposit_minor_below=settings.alert_deposit_minor_below,
    )


def payment_service(
    settings: Settings,
    database: Database,
    clock: Clock,
    rates: RateBook,
    gateway: PaymentGateway | None,
    alerts: AlertService | None = None,
) -> PaymentService:
    """Card payments through `gateway` (None: card payments are off)."""
    return PaymentService(
        database,
        gateway,
        PaymentSettings(
            card_mode=settings.card_mode,
            block_minutes=settings.block_minutes,
            authorize_minutes=settings.authorize_minutes,
            resolve_after_seconds=settings.payment_resolve_after_seconds,
        ),
        clock,
        rates,
        alerts,
    )


def funding_authority(
    settings: Settings, rates: RateBook, payments: PaymentService
) -> FundingAuthority:
    """Who pays for a minute: bank, deposit, card, then debt (under allow_debt) or owed."""
    return FundingAuthority(
        rates,
        payments,
        card_mode=settings.card_mode,
        allow_debt=settings.on_exhausted is OnExhausted.ALLOW_DEBT,
    )


def answering_service(
    settings: Settings,
    database: Database,
    clock: Clock,
    payments: PaymentService,
    funding: FundingAuthority,
) -> AnsweringService:
    """The voice webhook's answer: identify the caller, secure payment, connect."""
    return AnsweringService(
        database,
        AnsweringSettings(
            pin_secret=settings.secret("pin_secret"),
            pay_attempts=settings.pay_attempts,
            business_timezone=settings.business_timezone,
        ),
        clock,
        payments,
        funding,
    )


def metering_service(
    settings: Settings,
    database: Database,
    clock: Clock,
    rates: RateBook,
    payments: PaymentService,
    funding: FundingAuthority,
    alerts: AlertService | None = None,
) -> MeteringService:
    """The live tick, the minute poster it shares with settlement, and settlement."""
    poster = MinutePoster(clock, funding, increment_seconds=settings.increment_seconds)
    settlement = SettlementService(
        database,
        clock,
        rates,
        payments,
        funding,
        poster,
        increment_seconds=settings.increment_seconds,
        research_max_minutes=settings.research_max_minutes,
        settle_delay_seconds=settings.settle_delay_seconds,
        batch_max=settings.tick_batch_max,
    )
    metering_settings = MeteringSettings(
        increment_seconds=settings.increment_seconds,
        research_max_minutes=settings.research_max_minutes,
        on_exhausted=settings.on_exhausted,
        warn_minutes_left=settings.warn_minutes_left,
        grace_seconds=settings.grace_seconds,
        settle_delay_seconds=settings.settle_delay_seconds,
        tick_batch_max=settings.tick_batch_max,
        public_base_url=settings.public_base_url,
    )
    return MeteringService(
        database, metering_settings, clock, funding, poster, settlement, alerts=alerts
    )


def ingest_service(settings: Settings, database: Database, clock: Clock) -> IngestService:
    return IngestService(
        database,
        clock,
        stale_call_hours=settings.stale_call_hours,
        clock_skew_seconds_max=settings.twilio_clock_skew_seconds_max,
    )


def webhook_intake(
    settings: Settings,
    database: Database,
    clock: Clock,
    ingest: IngestService,
    metrics: Metrics,
) -> WebhookIntake:
    """Conference and call-status callbacks: into the database through the writer that
    group-commits them, else the local journal."""
    writer = IngestWriter(
        ingest,
        queue_max=settings.webhook_queue_max,
        batch_max=settings.webhook_batch_max,
        registry=metrics.registry,
    )
    return WebhookIntake(
        ingest,
        writer,
        WebhookJournal(settings.state_dir, bytes_max=settings.webhook_journal_bytes_max),
        clock,
        database.outage,
        wait_seconds=settings.webhook_journal_wait_ms / 1000,
        registry=metrics.registry,
        batch_max=settings.webhook_batch_max,
    )


def _raise(error: InvariantBroken) -> None:
    raise error
