"""Settings: defaults, the TOML file, the environment, secrets, and clear errors."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from meterd.config import SECRETS, SETTINGS, ConfigError, load_settings

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


def test_the_shipped_config_file_documents_every_setting_with_its_default(tmp_path):
    path = ROOT / "config" / "meterd.toml"
    document = tomllib.loads(path.read_text())
    shipped = {name: value for section in document.values() for name, value in section.items()}
    assert shipped == {s.name: s.default for s in SETTINGS}
    text = path.read_text()
    for setting in SETTINGS:
        assert setting.env_name in text
    for secret in SECRETS:
        assert secret.env_name in text
    loaded = load_settings(path, {"STATE_DIRECTORY": str(tmp_path)})
    assert loaded.values == {s.name: s.default for s in SETTINGS}


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
        ("METERD_ADMIN_TOKEN", "short", "admin_token"),
        ("METERD_LISTN", "127.0.0.1:1", "METERD_LISTN"),
    ],
)
def test_a_bad_value_names_the_setting(tmp_path, name, value, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(None, _env(tmp_path, **{name: value}))


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("[server]\nlisten = 8080\n", "listen"),
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
