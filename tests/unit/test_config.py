"""Settings: defaults, the TOML file, the environment, secrets, and clear errors."""

from __future__ import annotations

import dataclasses
import stat
import tomllib
from pathlib import Path

import pytest

from meterd.config import (
    SECRETS,
    SETTINGS,
    CardMode,
    ConfigError,
    OnExhausted,
    Settings,
    load_settings,
)
from meterd.config_example import render_example

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"METERD_STATE_DIR": str(tmp_path / "state"), **values}


def test_defaults_need_no_file_and_no_environment(tmp_path):
    settings = load_settings(None, _env(tmp_path))
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 8080)
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path}/state/meterd.sqlite3"
    assert settings.increment_seconds == 60 and settings.included_minutes == 45
    assert settings.public_base_url == "http://127.0.0.1:8080"


def test_state_dir_defaults_to_systemds_state_directory(tmp_path):
    settings = load_settings(None, {"STATE_DIRECTORY": str(tmp_path / "sd")})
    assert settings.state_dir == tmp_path / "sd"


def _declared(settings: Settings) -> dict[str, object]:
    return {s.name: getattr(settings, s.name) for s in SETTINGS}


def test_the_shipped_config_file_is_the_one_the_declaration_writes():
    shipped = (ROOT / "config" / "meterd.toml").read_text()
    assert shipped == render_example(), (
        "config/meterd.toml differs from the settings' declaration; write it again with "
        "python -m meterd.config_example > config/meterd.toml"
    )


def test_the_shipped_config_file_documents_every_setting_with_its_default(tmp_path):
    path = ROOT / "config" / "meterd.toml"
    document = tomllib.loads(path.read_text())
    shipped = {name: value for section in document.values() for name, value in section.items()}
    assert shipped == {s.name: _toml(s.default) for s in SETTINGS}
    text = path.read_text()
    for setting in SETTINGS:
        assert setting.env_name in text
    for secret in SECRETS:
        assert secret.env_name in text
    env = {"STATE_DIRECTORY": str(tmp_path)}
    assert _declared(load_settings(path, env)) == _declared(load_settings(None, env))


def _toml(default: object) -> object:
    return list(default) if isinstance(default, tuple) else default


def test_settings_carry_their_types(tmp_path):
    settings = load_settings(None, _env(tmp_path))
    assert settings.card_mode is CardMode.BLOCK and settings.card_mode == "block"
    assert settings.on_exhausted is OnExhausted.ANNOUNCE
    assert settings.state_dir == tmp_path / "state"
    assert settings.waiver_reasons == (
        "software_defect",
        "documentation_error",
        "service_outage",
        "goodwill",
    )
    given = load_settings(
        None,
        _env(
            tmp_path,
            METERD_CARD_MODE="authorize",
            METERD_ON_EXHAUSTED="allow_debt",
            METERD_WAIVER_REASONS="goodwill, outage",
        ),
    )
    assert given.card_mode is CardMode.AUTHORIZE
    assert given.on_exhausted is OnExhausted.ALLOW_DEBT and given.on_exhausted == "allow_debt"
    assert given.waiver_reasons == ("goodwill", "outage")


def test_settings_are_frozen(tmp_path):
    settings = load_settings(None, _env(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.increment_seconds = 30  # type: ignore[misc]


def test_environment_overrides_the_file(tmp_path):
    path = tmp_path / "meterd.toml"
    path.write_text('[server]\nlisten = "0.0.0.0:9000"\n[billing]\nincrement_seconds = 30\n')
    settings = load_settings(path, _env(tmp_path, METERD_LISTEN="127.0.0.1:9100"))
    assert settings.listen_port == 9100
    assert settings.increment_seconds == 30


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("METERD_LISTEN", "nonsense", "listen"),
        ("METERD_LISTEN", "127.0.0.1:99999", "listen"),
        ("METERD_INCREMENT_SECONDS", "1.5", "increment_seconds"),
        ("METERD_INCREMENT_SECONDS", "0", "increment_seconds"),
        ("METERD_DATABASE_URL", "mysql://x/y", "database_url"),
        ("METERD_BUSINESS_TIMEZONE", "Mars/Olympus", "business_timezone"),
        ("METERD_PUBLIC_BASE_URL", "calls.example.com", "public_base_url"),
        ("METERD_CARD_MODE", "cash", "card_mode"),
        ("METERD_CARD_MODE", "cash", "expected one of block, authorize"),
        ("METERD_ON_EXHAUSTED", "hang_up", "expected one of card, announce, allow_debt"),
        ("METERD_WAIVER_REASONS", " , ", "waiver_reasons"),
        ("METERD_ADMIN_TOKEN", "short", "admin_token"),
        ("METERD_LISTN", "127.0.0.1:1", "METERD_LISTN"),
        ("METERD_ALERTS_URL", "https://desk.example/hook", "METERD_ALERTS_SECRET"),
        ("METERD_ALERTS_URL", "desk.example/hook", "alerts_url"),
    ],
)
def test_a_bad_value_names_the_setting(tmp_path, name, value, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(None, _env(tmp_path, **{name: value}))


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("[server]\nlisten = 8080\n", "listen"),
        ('[billing]\non_exhausted = "debt"\n', "on_exhausted"),
        ("[billing]\nwaiver_reasons = []\n", "waiver_reasons"),
        ('[server]\nadmin_token = "0123456789abcdef0123"\n', "admin_token is a secret"),
        ("[server]\nno_such_thing = 1\n", "no_such_thing"),
        ('[billing]\nlisten = "127.0.0.1:1"\n', "listen"),
        ("not toml at all [", "cannot be read"),
    ],
)
def test_a_bad_file_names_the_problem(tmp_path, content, named):
    path = tmp_path / "meterd.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=named):
        load_settings(path, _env(tmp_path))


def test_missing_tokens_are_generated_once_with_mode_0600(tmp_path):
    first = load_settings(None, _env(tmp_path))
    assert {p.name for p in first.generated_secret_files} == {
        "admin_token",
        "agents_token",
        "finance_token",
        "pin_secret",
    }
    for path in first.generated_secret_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_settings(None, _env(tmp_path))
    assert second.generated_secret_files == ()
    assert second.secret("admin_token") == first.secret("admin_token")
    assert len({first.secret(n) for n in ("admin_token", "agents_token", "finance_token")}) == 3


def test_secrets_come_from_the_environment_before_systemd_credentials(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "admin_token").write_text("credential-token-0123456789\n")
    (credentials / "twilio_auth_token").write_text("twilio-token-0123456789abcdef\n")
    settings = load_settings(
        None,
        _env(
            tmp_path,
            CREDENTIALS_DIRECTORY=str(credentials),
            METERD_TWILIO_AUTH_TOKEN="env-token-0123456789abcdef",
        ),
    )
    assert settings.secret("admin_token") == "credential-token-0123456789"
    assert settings.secret("twilio_auth_token") == "env-token-0123456789abcdef"
    assert not (tmp_path / "state" / "secrets" / "admin_token").exists()
