"""Settings: defaults, then the TOML file, then the environment (`METERD_<NAME>`).

Every setting is declared once, as a field of `Settings` whose metadata carries its section,
default, documentation and limits; mypy sees each one with its type, and `SETTINGS` lists the
declarations for the loader, the docs and `config/meterd.toml` (written from them by
`meterd.config_example`; a test keeps the shipped file in step). Secrets (tokens, keys) are
never read from the TOML file: they come from the environment, from systemd credentials
(`$CREDENTIALS_DIRECTORY/<name>`), or, for the tokens meterd itself issues, from a file
generated once in the state directory. That directory (`<state_dir>/secrets`) is kept 0700 and
its files 0600: looser modes found there (a directory made by hand, a restored copy) are
tightened before a token is read, and `Settings` lists what was changed so the start can warn
about it; modes that cannot be tightened stop the start.

A bad value raises `ConfigError` naming the setting; `meterd run` turns it into exit status 2.
Every setting and every secret given is checked before anything is written: a bad value leaves
the state directory as it was (no generated token, no directory made).
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterd.core.money import MoneyError, check_currency

ENV_PREFIX = "METERD_"


class ConfigError(Exception):
    """A setting has a bad value; the message names the setting and where it came from."""


class CardMode(StrEnum):
    """How a per-minute caller with no minutes and no deposit is funded from a card."""

    BLOCK = "block"  # charge a block of minutes
    AUTHORIZE = "authorize"  # an authorisation hold, captured at completion


class OnExhausted(StrEnum):
    """What happens when a per-minute caller's funds run out mid-call."""

    CARD = "card"
    ANNOUNCE = "announce"
    ALLOW_DEBT = "allow_debt"


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port_text)


def _check_database_url(value: str) -> str:
    if not value:
        return value
    scheme = value.split("://", 1)[0]
    if scheme not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ValueError("expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB")
    if scheme == "postgresql+asyncpg" and importlib.util.find_spec("asyncpg") is None:
        raise ValueError(
            "PostgreSQL needs the asyncpg driver, which is not installed: install meterd with "
            "its postgresql extra, e.g. pip install 'meterd[postgresql]'"
        )
    return value


def _check_public_base_url(value: str) -> str:
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            "expected an absolute http(s) URL with no query, e.g. https://calls.example.com"
        )
    return value.rstrip("/")


def _check_phone_number(value: str) -> str:
    if value and not re.fullmatch(r"\+[1-9][0-9]{6,14}", value):
        raise ValueError("expected a phone number in E.164 form, e.g. +15005550006")
    return value


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"unknown time zone {value!r}") from error
    return value


def _check_currency(value: str) -> str:
    try:
        return check_currency(value)
    except MoneyError:
        raise ValueError("expected an ISO 4217 currency code in capitals, e.g. USD") from None


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return check


def _check_cron(value: str) -> str:
    """Parse the expression as the scheduler will (`meterd.crontab`: cron's weekday numbers), so
    a value that passes here cannot fail at start-up; and it must fire at least once."""
    import datetime as dt

    from meterd import crontab

    example = "e.g. '30 0 * * *' (minute hour day month weekday, 0 or 7 = Sunday)"
    try:
        trigger = crontab.trigger(value, dt.UTC)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{value!r} is not a crontab expression: {error}; {example}") from None
    if trigger.get_next_fire_time(None, dt.datetime.now(dt.UTC)) is None:
        raise ValueError(f"{value!r} never fires; {example}")
    return value


@dataclass(frozen=True)
class Setting:
    """One setting as declared on its `Settings` field: where it goes in the TOML file, its
    default, what it does and its limits. `name` and `kind` come from the field itself (its
    name, and its type as read from the file: int, str, tuple of names, or a StrEnum)."""

    section: str
    default: Any
    doc: str
    minimum: int | None = None
    maximum: int | None = None
    check: Callable[[str], Any] | None = None
    name: str = ""
    kind: type = str

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.name.upper()


_SETTING = "meterd.setting"


def _setting(
    section: str,
    default: Any,
    doc: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    check: Callable[[str], Any] | None = None,
) -> dict[str, Setting]:
    """The metadata of a `Settings` field that is a setting."""
    return {_SETTING: Setting(section, default, doc, minimum, maximum, check)}


@dataclass(frozen=True)
class Settings:
    """Every setting, checked, with its type; then what the loader derives. `state_dir`,
    `database_url` and `public_base_url` hold the values in force (their empty defaults mean
    the state directory systemd gives or ./var, SQLite in it, and http://<listen>)."""

    # [server]
    listen: str = field(
        metadata=_setting(
            "server",
            "127.0.0.1:8080",
            "address the HTTP server binds, host:port",
            check=_parse_listen,
        )
    )
    public_base_url: str = field(
        metadata=_setting(
            "server",
            "",
            "the public URL Twilio calls (scheme, host, optional port and path prefix); "
            "signatures are checked against it. Empty: http://<listen>",
            check=_check_public_base_url,
        )
    )
    request_body_bytes_max: int = field(
        metadata=_setting(
            "server",
            64 * 1024,
            "largest request body accepted; larger gets 413",
            minimum=1024,
            maximum=16 * 1024 * 1024,
        )
    )
    http_connections_max: int = field(
        metadata=_setting(
            "server",
            512,
            "most client connections held at once; past it the oldest connection with no "
            "request being handled is closed to make room, or the new one if every connection "
            "is busy",
            minimum=8,
            maximum=100_000,
        )
    )
    http_idle_timeout_seconds: int = field(
        metadata=_setting(
            "server",
            15,
            "a connection with no request under way is closed after this long: keep-alive, "
            "and clients that connect and send nothing or their headers too slowly",
            minimum=1,
            maximum=3600,
        )
    )
    http_request_read_timeout_seconds: int = field(
        metadata=_setting(
            "server",
            10,
            "a request's body must arrive within this long of its headers; slower gets 408 "
            "and the connection is closed",
            minimum=1,
            maximum=600,
        )
    )
    http_headers_max: int = field(
        metadata=_setting(
            "server", 32, "most header lines in one request; more gets 400", minimum=8, maximum=128
        )
    )
    http_header_line_bytes_max: int = field(
        metadata=_setting(
            "server",
            8190,
            "longest request line or header line; longer gets 400",
            minimum=1024,
            maximum=65_536,
        )
    )
    shutdown_timeout_seconds: int = field(
        metadata=_setting(
            "server",
            20,
            "how long a stop waits for in-flight requests and the running tick",
            minimum=1,
            maximum=600,
        )
    )
    # [storage]
    state_dir: Path = field(
        metadata=_setting(
            "storage",
            "",
            "where meterd keeps its SQLite file, generated tokens and usage files. Empty: "
            "$STATE_DIRECTORY if systemd set it, else ./var",
        )
    )
    database_url: str = field(
        metadata=_setting(
            "storage",
            "",
            "SQLAlchemy URL. Empty: sqlite+aiosqlite:///<state_dir>/meterd.sqlite3. "
            "PostgreSQL: postgresql+asyncpg://user@host/db",
            check=_check_database_url,
        )
    )
    sqlite_busy_timeout_ms: int = field(
        metadata=_setting(
            "storage",
            5000,
            "how long a SQLite writer waits for another writer's lock",
            minimum=0,
            maximum=600_000,
        )
    )
    webhook_journal_wait_ms: int = field(
        metadata=_setting(
            "storage",
            2000,
            "how long a conference or call-status callback waits for the database before it "
            "is written to the local webhook journal instead (and answered 2xx); an outage "
            "goes there at once",
            minimum=50,
            maximum=10_000,
        )
    )
    webhook_journal_bytes_max: int = field(
        metadata=_setting(
            "storage",
            64 * 1024 * 1024,
            "largest size of the webhook journal (<state_dir>/webhook-journal.log); when "
            "full, callbacks get 503 and Twilio retries them",
            minimum=64 * 1024,
            maximum=16 * 1024 * 1024 * 1024,
        )
    )
    webhook_queue_max: int = field(
        metadata=_setting(
            "storage",
            800,
            "most conference and call-status callbacks waiting for the database at once (about "
            "2 s of work on SQLite); when full, a callback gets 503 with Retry-After and Twilio "
            "retries it. Keep it below what meterd records in webhook_journal_wait_ms",
            minimum=1,
            maximum=1_000_000,
        )
    )
    webhook_batch_max: int = field(
        metadata=_setting(
            "storage",
            256,
            "most callbacks recorded in one write transaction (group commit: one commit, then "
            "each is answered)",
            minimum=1,
            maximum=4096,
        )
    )
    # [billing]
    currency: str = field(
        metadata=_setting(
            "billing", "USD", "default currency of new accounts", check=_check_currency
        )
    )
    increment_seconds: int = field(
        metadata=_setting(
            "billing",
            60,
            "billable time is charged in whole increments of this many seconds, rounded up",
            minimum=1,
            maximum=3600,
        )
    )
    included_minutes: int = field(
        metadata=_setting(
            "billing",
            45,
            "minutes banked once per account by its first main product (Desktop or Web)",
            minimum=0,
            maximum=100_000,
        )
    )
    rate_per_agent_minute_minor: int = field(
        metadata=_setting(
            "billing",
            100,
            "price of one agent-minute taken from the deposit, in minor units",
            minimum=0,
            maximum=10**9,
        )
    )
    incident_price_minor: int = field(
        metadata=_setting(
            "billing",
            5000,
            "price of one per_incident incident (up to 2 hours), in minor units",
            minimum=0,
            maximum=10**9,
        )
    )
    incident_link_days: int = field(
        metadata=_setting(
            "billing",
            14,
            "how long after an incident a follow-up call may be linked to it",
            minimum=0,
            maximum=3650,
        )
    )
    card_mode: CardMode = field(
        metadata=_setting(
            "billing",
            CardMode.BLOCK,
            "card funding: block (charge a block of minutes) or authorize (authorisation "
            "hold, captured at completion)",
        )
    )
    block_minutes: int = field(
        metadata=_setting(
            "billing", 30, "minutes bought by one card block", minimum=1, maximum=10_000
        )
    )
    block_price_minor: int = field(
        metadata=_setting(
            "billing", 3000, "price of one card block, minor units", minimum=0, maximum=10**9
        )
    )
    authorize_minutes: int = field(
        metadata=_setting(
            "billing",
            30,
            "minutes' worth held by one card authorisation",
            minimum=1,
            maximum=10_000,
        )
    )
    on_exhausted: OnExhausted = field(
        metadata=_setting(
            "billing",
            OnExhausted.ANNOUNCE,
            "when a per_minute caller runs out mid-call: card, announce or allow_debt",
        )
    )
    auto_top_up_per_day: int = field(
        metadata=_setting(
            "billing",
            3,
            "at most this many blocks bought by auto top-up per account in any 24 hours",
            minimum=1,
            maximum=100,
        )
    )
    warn_minutes_left: int = field(
        metadata=_setting(
            "billing", 2, "announce this many minutes before funds run out", minimum=0, maximum=60
        )
    )
    grace_seconds: int = field(
        metadata=_setting(
            "billing",
            60,
            "how long a call goes on after funds ran out, under announce",
            minimum=0,
            maximum=3600,
        )
    )
    pay_attempts: int = field(
        metadata=_setting(
            "billing", 3, "card attempts before a polite goodbye", minimum=1, maximum=10
        )
    )
    research_max_minutes: int = field(
        metadata=_setting(
            "billing",
            120,
            "an open research interval closes itself after this long",
            minimum=1,
            maximum=24 * 60,
        )
    )
    waiver_days: int = field(
        metadata=_setting(
            "billing",
            30,
            "how long after a call its charges may be waived",
            minimum=0,
            maximum=3650,
        )
    )
    waiver_reasons: tuple[str, ...] = field(
        metadata=_setting(
            "billing",
            ("software_defect", "documentation_error", "service_outage", "goodwill"),
            "reasons an agent may give for a waiver",
        )
    )
    settle_delay_seconds: int = field(
        metadata=_setting(
            "billing",
            300,
            "a call is settled this long after it ended (late webhooks arrive, research may "
            "still start); after settlement its minutes are final",
            minimum=0,
            maximum=24 * 3600,
        )
    )
    stale_call_hours: int = field(
        metadata=_setting(
            "billing",
            12,
            "a call with no end event for this long is closed by the sweeper and flagged",
            minimum=1,
            maximum=24 * 14,
        )
    )
    # [schedule]
    business_timezone: str = field(
        metadata=_setting(
            "schedule",
            "UTC",
            "time zone of the business day used by the nightly usage",
            check=_check_timezone,
        )
    )
    usage_cron: str = field(
        metadata=_setting(
            "schedule",
            "30 0 * * *",
            "when the nightly usage of the previous business day is built (crontab, business "
            "time zone; weekdays as cron counts them, 0 or 7 = Sunday)",
            check=_check_cron,
        )
    )
    tick_interval_seconds: int = field(
        metadata=_setting("schedule", 1, "how often the metering tick runs", minimum=1, maximum=60)
    )
    tick_batch_max: int = field(
        metadata=_setting(
            "schedule",
            2000,
            "most due minutes one metering tick posts",
            minimum=1,
            maximum=1_000_000,
        )
    )
    # [twilio]
    twilio_account_sid: str = field(
        metadata=_setting(
            "twilio",
            "",
            "the Twilio account (AC...) meterd's REST requests act on (announcements, "
            "hang-ups). Empty: no REST requests are made, and they are logged instead",
        )
    )
    twilio_api_base_url: str = field(
        metadata=_setting(
            "twilio",
            "https://api.twilio.com",
            "Twilio's REST API address (tests point it at a local server)",
            check=_check_public_base_url,
        )
    )
    callback_from_number: str = field(
        metadata=_setting(
            "twilio",
            "",
            "the desk's Twilio number (E.164) that callbacks (POST /agents/callbacks) ring the "
            "customer from. Empty: callbacks are off (503), as they are with no Twilio account",
            check=_check_phone_number,
        )
    )
    twilio_clock_skew_seconds_max: int = field(
        metadata=_setting(
            "twilio",
            86_400,
            "a conference or call-status callback whose Timestamp is earlier than the call's "
            "voice webhook (by meterd's clock) by more than this is refused with 400, as is "
            "one ahead of meterd's clock by more than a day (or this, if larger)",
            minimum=0,
            maximum=7 * 24 * 3600,
        )
    )
    # [payments]
    pay_connector: str = field(
        metadata=_setting(
            "payments",
            "Default",
            "the unique name of the Twilio <Pay> connector (Stripe) that tokenises cards",
        )
    )
    stripe_api_base_url: str = field(
        metadata=_setting(
            "payments",
            "https://api.stripe.com",
            "Stripe's API address (tests point it at localstripe); the key is "
            "METERD_STRIPE_SECRET_KEY",
            check=_check_public_base_url,
        )
    )
    gateway_timeout_seconds: int = field(
        metadata=_setting(
            "payments",
            8,
            "how long a card operation may take; Twilio waits 15 s for the webhook that waits "
            "for it",
            minimum=1,
            maximum=14,
        )
    )
    payment_resolve_after_seconds: int = field(
        metadata=_setting(
            "payments",
            60,
            "a card operation sent but never answered (a crash, a timeout) is looked up at "
            "the gateway this long after it was sent, and completed or failed as the gateway "
            "says",
            minimum=1,
            maximum=86_400,
        )
    )
    # [alerts]
    alerts_url: str = field(
        metadata=_setting(
            "alerts",
            "",
            "the desk's URL meterd POSTs alerts to (low balances, exhaustion, card charges and "
            "declines, waivers), signed with the alerts secret. Empty: no alerts",
            check=_check_public_base_url,
        )
    )
    alert_bank_minutes_below: int = field(
        metadata=_setting(
            "alerts",
            10,
            "an account's banked minutes falling below this is an alert (0: none); an account "
            "may set its own",
            minimum=0,
            maximum=1_000_000,
        )
    )
    alert_deposit_minor_below: int = field(
        metadata=_setting(
            "alerts",
            0,
            "an account's deposit falling below this (minor units) is an alert (0: none); an "
            "account may set its own",
            minimum=0,
            maximum=10**12,
        )
    )
    reconcile_tolerance_seconds: int = field(
        metadata=_setting(
            "alerts",
            10,
            "the nightly reconciliation with Twilio's call records reports a call whose length "
            "differs by more than this between Twilio and meterd",
            minimum=0,
            maximum=3600,
        )
    )
    # [log]
    log_level: str = field(
        metadata=_setting(
            "log",
            "info",
            "debug, info, warning or error",
            check=_one_of("debug", "info", "warning", "error"),
        )
    )

    # derived by the loader
    secrets: Mapping[str, str]
    listen_host: str
    listen_port: int
    generated_secret_files: tuple[Path, ...] = field(default=())
    secrets_from_state_dir: frozenset[str] = field(default=frozenset())
    # secrets directory and files others could read, made private: (path, mode was, mode now)
    secret_modes_fixed: tuple[tuple[Path, int, int], ...] = field(default=())

    def secret(self, name: str) -> str:
        return self.secrets.get(name, "")


def _kind(hint: Any) -> type:
    """The type a setting has in the TOML file and the environment, from its field's type."""
    if hint is int or hint is str:
        return hint
    if hint is Path:
        return str  # a path is given as text
    if hint == tuple[str, ...]:
        return tuple
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return hint
    raise TypeError(f"a setting cannot have the type {hint!r}")


def _declared() -> tuple[Setting, ...]:
    hints = get_type_hints(Settings)
    return tuple(
        replace(f.metadata[_SETTING], name=f.name, kind=_kind(hints[f.name]))
        for f in fields(Settings)
        if _SETTING in f.metadata
    )


SETTINGS: tuple[Setting, ...] = _declared()
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Secret:
    name: str
    env_name: str
    doc: str
    generated: bool  # generated once into the state directory when missing


SECRETS: tuple[Secret, ...] = (
    Secret("admin_token", "METERD_ADMIN_TOKEN", "bearer token for /admin/*", generated=True),
    Secret("agents_token", "METERD_AGENTS_TOKEN", "bearer token for /agents/*", generated=True),
    Secret("finance_token", "METERD_FINANCE_TOKEN", "bearer token for /finance/*", generated=True),
    Secret(
        "pin_secret",
        "METERD_PIN_SECRET",
        "HMAC key under which account PINs are stored",
        generated=True,
    ),
    Secret(
        "twilio_auth_token",
        "METERD_TWILIO_AUTH_TOKEN",
        "Twilio auth token: signs webhooks and authenticates REST calls",
        generated=False,
    ),
    Secret(
        "twilio_webhook_key",
        "METERD_TWILIO_WEBHOOK_KEY",
        "Twilio webhook SharedKey secret: checks webhooks signed with the newer scheme "
        "(X-Twilio-Webhooks-Signature-Settings, HMAC-SHA256)",
        generated=False,
    ),
    Secret("stripe_secret_key", "METERD_STRIPE_SECRET_KEY", "Stripe secret key", generated=False),
    Secret(
        "alerts_secret",
        "METERD_ALERTS_SECRET",
        "HMAC key the alerts POSTed to alerts_url are signed with (needed with alerts_url)",
        generated=False,
    ),
)

SECRET_MIN_CHARS = 16


def _coerce(setting: Setting, raw: Any, origin: str) -> Any:
    def bad(reason: str) -> ConfigError:
        return ConfigError(f"bad setting {setting.name} ({origin}): {reason}")

    value: Any
    if setting.kind is int:
        if isinstance(raw, bool):
            raise bad("expected a whole number")
        if isinstance(raw, str):
            text = raw.strip()
            if not text.lstrip("-").isdigit() or len(text) > 19:
                raise bad(f"expected a whole number, got {raw!r}")
            raw = int(text)
        if not isinstance(raw, int):
            raise bad(f"expected a whole number, got {raw!r}")
        if setting.minimum is not None and raw < setting.minimum:
            raise bad(f"{raw} is below the minimum {setting.minimum}")
        if setting.maximum is not None and raw > setting.maximum:
            raise bad(f"{raw} is above the maximum {setting.maximum}")
        value = raw
    elif setting.kind is tuple:
        if isinstance(raw, str):
            raw = [item.strip() for item in raw.split(",") if item.strip()]
        if not isinstance(raw, list) or not all(isinstance(i, str) and i for i in raw) or not raw:
            raise bad("expected a non-empty list of names")
        value = tuple(raw)
    else:
        if not isinstance(raw, str):
            raise bad(f"expected text, got {raw!r}")
        value = raw.strip()
        if issubclass(setting.kind, StrEnum):
            if value not in {member.value for member in setting.kind}:
                raise bad(f"expected one of {', '.join(setting.kind)}")
            value = setting.kind(value)
    if setting.check is not None:
        try:
            setting.check(value)
        except ValueError as error:
            raise bad(str(error)) from None
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    flat: dict[str, Any] = {}
    for section, body in document.items():
        if not isinstance(body, dict):
            raise ConfigError(f"config file {path}: {section!r} must be a [section]")
        for name, raw in body.items():
            setting = SETTINGS_BY_NAME.get(name)
            if any(secret.name == name for secret in SECRETS):
                raise ConfigError(
                    f"config file {path}: {name} is a secret; set it in the environment "
                    f"or as a systemd credential, never in a file"
                )
            if setting is None or setting.section != section:
                raise ConfigError(f"config file {path}: unknown setting [{section}] {name}")
            flat[name] = raw
    return flat


def load_settings(
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    generate_secrets: bool = True,
) -> Settings:
    """Resolve and check every setting, then the secrets; only when all of them are good are
    missing tokens generated (the first thing written). With `generate_secrets=False` (a client
    of a running daemon, e.g. `meterd simulate`) tokens already in the state directory are read
    and missing ones stay missing."""
    env = os.environ if environ is None else environ
    values = _values(config_path, env)
    state_dir = Path(
        values["state_dir"] or env.get("STATE_DIRECTORY", "").split(":")[0] or "var"
    ).resolve()
    host, port = _parse_listen(values["listen"])
    resolved, generated, modes_fixed = _resolve_secrets(env, state_dir, generate=generate_secrets)
    if values["alerts_url"] and not resolved.get("alerts_secret") and generate_secrets:
        raise ConfigError(
            "alerts_url is set but the alerts secret is not: set METERD_ALERTS_SECRET (the desk "
            "checks each alert's signature with it)"
        )
    return Settings(
        **{
            **values,
            "state_dir": state_dir,
            "database_url": values["database_url"]
            or f"sqlite+aiosqlite:///{state_dir}/meterd.sqlite3",
            "public_base_url": values["public_base_url"] or f"http://{values['listen']}",
        },
        secrets=resolved,
        listen_host=host,
        listen_port=port,
        generated_secret_files=tuple(generated),
        secret_modes_fixed=tuple(modes_fixed),
        secrets_from_state_dir=frozenset(
            s.name
            for s in SECRETS
            if s.generated
            and s.name in resolved
            and s.env_name not in env
            and not (
                env.get("CREDENTIALS_DIRECTORY")
                and (Path(env["CREDENTIALS_DIRECTORY"]) / s.name).is_file()
            )
        ),
    )


def _values(config_path: Path | None, env: Mapping[str, str]) -> dict[str, Any]:
    """Every setting as given, checked: the environment's, else the file's, else the default.
    A `METERD_*` variable that names no setting or secret is an error, not ignored."""
    from_file = _read_toml(config_path) if config_path is not None else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.env_name in env:
            values[setting.name] = _coerce(setting, env[setting.env_name], setting.env_name)
        elif setting.name in from_file:
            values[setting.name] = _coerce(setting, from_file[setting.name], str(config_path))
        else:
            values[setting.name] = setting.default
    for name in env:
        if (
            name.startswith(ENV_PREFIX)
            and name[len(ENV_PREFIX) :].lower() not in SETTINGS_BY_NAME
            and name not in {s.env_name for s in SECRETS}
            and name != "METERD_CONFIG"
        ):
            raise ConfigError(f"unknown setting {name} in the environment")
    return values


SECRETS_DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600


def _resolve_secrets(
    env: Mapping[str, str], state_dir: Path, *, generate: bool = True
) -> tuple[dict[str, str], list[Path], list[tuple[Path, int, int]]]:
    """Secrets from the environment, then systemd credentials, then (tokens meterd issues) the
    state directory. Those given are checked first, then the files already there; only then
    are missing tokens generated, so a bad secret leaves the state directory untouched."""
    resolved: dict[str, str] = {}
    generated: list[Path] = []
    modes_fixed: list[tuple[Path, int, int]] = []
    credentials_dir = env.get("CREDENTIALS_DIRECTORY")
    from_state_dir: list[Secret] = []
    for secret in SECRETS:
        if secret.env_name in env:
            resolved[secret.name] = _checked_secret(secret, env[secret.env_name], secret.env_name)
        elif credentials_dir and (Path(credentials_dir) / secret.name).is_file():
            resolved[secret.name] = _checked_secret(
                secret,
                (Path(credentials_dir) / secret.name).read_text().strip(),
                f"systemd credential {secret.name}",
            )
        elif secret.generated:
            from_state_dir.append(secret)
    if not from_state_dir:
        return resolved, generated, modes_fixed
    directory = state_dir / "secrets"
    _make_private(directory, SECRETS_DIR_MODE, modes_fixed)  # a stat once tight
    missing: list[Secret] = []
    for secret in from_state_dir:
        path = directory / secret.name
        if path.exists():
            _make_private(path, SECRET_FILE_MODE, modes_fixed)
            resolved[secret.name] = _checked_secret(secret, path.read_text().strip(), str(path))
        else:
            missing.append(secret)
    for secret in missing if generate else ():
        path = directory / secret.name
        if write_new_secret(path):
            generated.append(path)
        _make_private(path, SECRET_FILE_MODE, modes_fixed)
        resolved[secret.name] = _checked_secret(secret, path.read_text().strip(), str(path))
    return resolved, generated, modes_fixed


def _checked_secret(secret: Secret, value: str, origin: str) -> str:
    if len(value) < SECRET_MIN_CHARS or any(ch.isspace() for ch in value):
        raise ConfigError(
            f"bad setting {secret.name} ({origin}): must be at least "
            f"{SECRET_MIN_CHARS} characters with no spaces"
        )
    return value


def _make_private(path: Path, mode: int, fixed: list[tuple[Path, int, int]]) -> None:
    """If `path` exists and its group or others have any access, chmod it to `mode` and note it
    in `fixed`; if that fails, refuse to go on with a secret others may read."""
    try:
        was = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"cannot check the mode of {path}: {error}") from None
    if not was & 0o077:
        return
    try:
        path.chmod(mode)
    except OSError as error:
        raise ConfigError(
            f"{path} is mode {was:04o}, open to others, and cannot be made {mode:04o}: {error}; "
            f"fix its mode (and rotate the tokens in it)"
        ) from None
    fixed.append((path, was, mode))


def write_new_secret(path: Path) -> bool:
    """Write a fresh random token to `path` (mode 0600; its directory 0700) unless another
    process already did; True if this call wrote it.

    The token is written to a private temporary file first and linked into place, so a reader
    never sees a half-written token and two processes starting together agree on one token.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False  # another process made it first; read theirs
        finally:
            temporary.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write a generated token to {path}: {error}") from None
    return True
