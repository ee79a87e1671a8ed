"""Unattended operation of the real `meterd run` process: systemd's notify protocol and watchdog
against a socket the test opens, graceful stop under load, /metrics, and `meterd db backup`.

The database is made unavailable by holding SQLite's write lock from the test
(`BEGIN IMMEDIATE`): the daemon's health check, its webhooks and its metering tick all need that
lock, so they wait for it exactly as they would for a stuck disk or a hung writer."""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import socket
import sqlite3
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.call_scripts import CallScript
from tests.twilio_payloads import conference_params, encode_form, sign

from .daemon import Daemon, run_cli
from .test_call_timelines import PUBLIC_BASE_URL, TWILIO_TOKEN, post_twilio
from .test_metering_daemon import daemon_env, make_account

WATCHDOG_USEC = 2_000_000  # the daemon pings every second
WAIT_SECONDS = 30


class NotifySocket:
    """The socket systemd would listen on (`NOTIFY_SOCKET`): records every datagram with the time
    it arrived."""

    def __init__(self) -> None:
        # a short path: AF_UNIX paths are limited to 107 bytes
        self._directory = Path(tempfile.mkdtemp(prefix="meterd-notify-"))
        self.path = str(self._directory / "notify")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.path)
        self._socket.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(
        self, assignment: str, since: float = 0.0, until: float = float("inf")
    ) -> list[float]:
        """When datagrams carrying `assignment` (e.g. "WATCHDOG=1") arrived in [since, until]."""
        return [
            at
            for at, message in list(self.messages)
            if assignment in message.split("\n") and since <= at <= until
        ]

    def wait_for(self, assignment: str, count: int = 1, since: float = 0.0) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(self.times(assignment, since)) < count:
            assert time.monotonic() < deadline, f"no {count} x {assignment}: {self.messages}"
            time.sleep(0.05)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._socket.close()
        Path(self.path).unlink(missing_ok=True)
        self._directory.rmdir()


@contextlib.contextmanager
def notify_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket()
    try:
        yield listener
    finally:
        listener.close()


@contextlib.contextmanager
def database_locked(daemon: Daemon) -> Iterator[None]:
    """Hold the SQLite write lock: nothing else can write until the block ends."""
    connection = sqlite3.connect(
        daemon.cwd / "var" / "meterd.sqlite3", timeout=WAIT_SECONDS, isolation_level=None
    )
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def test_notify_ready_watchdog_only_while_healthy_and_stopping(tmp_path):
    """READY once; WATCHDOG=1 while the health check passes, degraded included (the database is
    away and webhooks go to the journal: a restart would not help); none once the journal is full
    too (unhealthy: systemd's watchdog restarts meterd); STOPPING=1 once, and no ping after it."""
    env = daemon_env(
        NOTIFY_SOCKET="",
        WATCHDOG_USEC=str(WATCHDOG_USEC),
        METERD_SQLITE_BUSY_TIMEOUT_MS="100",
        METERD_WEBHOOK_JOURNAL_BYTES_MAX=str(64 * 1024),
    )
    with notify_socket() as notify:
        env["NOTIFY_SOCKET"] = notify.path
        daemon = Daemon(tmp_path, env=env).start()
        try:
            notify.wait_for("READY=1")
            ready_at = notify.times("READY=1")[0]
            notify.wait_for("WATCHDOG=1", count=3, since=ready_at)
            assert any(m.startswith("READY=1\nSTATUS=ready: listening") for _, m in notify.messages)
            assert any("STATUS=ok: 0 open calls" in m for _, m in notify.messages)
            make_account(daemon, "acme", ["+14155550142"], deposit_minor=10**6, licence=False)
            script = CallScript(1, dt.datetime.now(dt.UTC).replace(microsecond=0))
            assert "<Conference" in post_twilio(daemon, "/twilio/voice", script.voice())[1]

            with database_locked(daemon):
                locked_at = time.monotonic()
                time.sleep(1.5)
                status, body = daemon.request("GET", "/healthz")
                assert status == 200 and body["status"] == "degraded", body
                notify.wait_for("WATCHDOG=1", count=2, since=locked_at + 1)
                # fill the journal: callbacks of the call, padded
                statuses = []
                for n in range(100):
                    params = conference_params(
                        script.conference_sid,
                        script.call_sid,
                        "participant-hold",
                        n,
                        script.at(0),
                        call_sid=script.call_sid,
                        label="customer",
                    )
                    params["Padding"] = "x" * 1500
                    statuses.append(_post_form(daemon, "/twilio/conference", params))
                    if statuses[-1] == 503:
                        break
                full_at = time.monotonic()
                assert statuses[-1] == 503 and set(statuses[:-1]) == {204}, statuses
                status, body = daemon.request("GET", "/healthz")
                assert status == 503 and body["status"] == "unhealthy", body
                time.sleep(max(0.0, full_at + 4 - time.monotonic()))
                released_at = time.monotonic()
            # a check begun just before the journal filled may still pass: allow it one second
            assert notify.times("WATCHDOG=1", since=full_at + 1, until=released_at) == []
            degraded = [
                m
                for at, m in notify.messages
                if locked_at + 1 <= at <= full_at and "STATUS=degraded: journaling" in m
            ]
            assert degraded, notify.messages
            notify.wait_for("WATCHDOG=1", count=2, since=released_at)
            deadline = time.monotonic() + WAIT_SECONDS
            while daemon.request("GET", "/healthz") != (200, {"status": "ok"}):
                assert time.monotonic() < deadline, "not healthy again after the lock"
                time.sleep(0.2)
        finally:
            assert daemon.stop() == 0
        notify.wait_for("STOPPING=1")
        stopping = notify.times("STOPPING=1")
        assert len(stopping) == 1
        assert notify.times("WATCHDOG=1", since=stopping[0]) == []
        assert notify.times("READY=1") == [ready_at]


def _post_form(daemon: Daemon, path: str, params: dict[str, str]) -> int:
    request = urllib.request.Request(
        daemon.base_url + path, data=encode_form(params), method="POST"
    )
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    request.add_header("X-Twilio-Signature", sign(PUBLIC_BASE_URL + path, params, TWILIO_TOKEN))
    try:
        with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _staggered_calls(daemon: Daemon, count: int = 30) -> list[CallScript]:
    """`count` calls still up, each with an agent billable for ten minutes or more, joined two
    seconds apart: with 30 of them some call has a minute falling due every two seconds, so the
    metering tick writes every few seconds (an idle tick only reads)."""
    numbers = [f"+1415556{n:04d}" for n in range(count)]
    make_account(daemon, "acme", numbers, deposit_minor=10**6, licence=False)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    scripts = []
    for n, number in enumerate(numbers):
        base = now - dt.timedelta(seconds=600 + 60 * n // count)
        script = CallScript(700 + n, base, from_number=number)
        script.join("customer", 0).join("agent:a", 0)
        assert "<Conference" in post_twilio(daemon, "/twilio/voice", script.voice())[1]
        for params in script.events:
            assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
        scripts.append(script)
    return scripts


def _wait_for_a_blocked_tick(daemon: Daemon) -> None:
    """While the database is locked: wait until a metering tick is running (waiting for it)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while _value(_metrics(daemon), "meterd_scheduler_jobs_running", job="metering-tick") != 1:
        assert time.monotonic() < deadline, "no metering tick began while the database was locked"


def _mute_events(script: CallScript, count: int) -> list[dict[str, str]]:
    """Mute and unmute callbacks (stored, ignored by the timeline), each with its own sequence."""
    return [
        conference_params(
            script.conference_sid,
            script.call_sid,
            "participant-unmute" if k % 2 else "participant-mute",
            100 + k,
            script.at(300 + k),
            call_sid=script.leg("agent:a"),
            label="agent:a",
            muted=not k % 2,
        )
        for k in range(count)
    ]


def _stored_dedup_keys(daemon: Daemon) -> set[str]:
    with contextlib.closing(sqlite3.connect(daemon.cwd / "var" / "meterd.sqlite3")) as connection:
        return {row[0] for row in connection.execute("SELECT dedup_key FROM webhook_events")}


def test_sigterm_during_a_webhook_burst_and_a_running_tick_keeps_every_accepted_webhook(tmp_path):
    env = daemon_env(METERD_SQLITE_BUSY_TIMEOUT_MS="60000", METERD_SHUTDOWN_TIMEOUT_SECONDS="30")
    daemon = Daemon(tmp_path, env=env).start()
    scripts = _staggered_calls(daemon)
    answers: list[tuple[str, int | None, float]] = []  # dedup key, status (None: refused), when

    def send(events: list[dict[str, str]]) -> None:
        for params in events:
            key = f"conference:{params['ConferenceSid']}:{params['SequenceNumber']}"
            try:
                status: int | None = _post_form(daemon, "/twilio/conference", params)
            except OSError:  # refused or reset: the daemon stopped listening
                status = None
            answers.append((key, status, time.monotonic()))
            if daemon.process.poll() is not None:
                return

    senders = [
        threading.Thread(target=send, args=(_mute_events(script, 200),)) for script in scripts[:8]
    ]
    for sender in senders:
        sender.start()
    time.sleep(0.5)
    with database_locked(daemon):
        _wait_for_a_blocked_tick(daemon)  # and the webhooks in flight wait for the lock too
        terminated_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
    assert daemon.process.wait(60) == 0, daemon.log()
    for sender in senders:
        sender.join(60)

    answered = [(key, status, at) for key, status, at in answers if status is not None]
    assert {status for _, status, _ in answered} == {204}, daemon.log()[-3000:]
    assert any(at > terminated_at for _, _, at in answered)  # in flight when the signal came
    stored = _stored_dedup_keys(daemon)
    assert {key for key, _, _ in answered} <= stored
    log = daemon.log()
    assert "still running at the stop timeout" not in log
    assert "scheduled job failed" not in log
    check = run_cli(["ledger", "check"], daemon.env, tmp_path)
    assert check.returncode == 0, check.stdout


def test_a_second_signal_stops_at_once(tmp_path):
    env = daemon_env(METERD_SQLITE_BUSY_TIMEOUT_MS="60000")
    daemon = Daemon(tmp_path, env=env).start()
    _staggered_calls(daemon)
    with database_locked(daemon):
        _wait_for_a_blocked_tick(daemon)  # a stop now waits for the tick, so for the lock
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert daemon.process.poll() is None
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 5
    assert "second signal: stopping at once" in daemon.log()


def _metrics(daemon: Daemon) -> dict[str, list]:
    with urllib.request.urlopen(daemon.base_url + "/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _value(families: dict[str, list], name: str, family: str = "", **labels: str) -> float:
    for sample in families.get(family or name.removesuffix("_total"), []):
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return 0.0


def test_metrics_parse_and_move_when_webhooks_arrive(tmp_path):
    daemon = Daemon(tmp_path, env=daemon_env()).start()
    try:
        before = _metrics(daemon)
        assert _value(before, "meterd_healthy") == 1
        voice = CallScript(900, dt.datetime.now(dt.UTC)).voice()
        assert _post_form(daemon, "/twilio/voice", voice) == 200
        forged = dict(voice, CallSid=voice["CallSid"][:-1] + "f")
        request = urllib.request.Request(
            daemon.base_url + "/twilio/voice", data=encode_form(forged), method="POST"
        )
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        request.add_header("X-Twilio-Signature", sign(PUBLIC_BASE_URL, voice, TWILIO_TOKEN))
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError("a forged webhook was accepted")
        except urllib.error.HTTPError as error:
            assert error.code == 403

        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            after = _metrics(daemon)
            if _value(after, "meterd_scheduler_job_runs_total", job="metering-tick") > 0:
                break
            assert time.monotonic() < deadline, "no metering tick ran"
            time.sleep(0.2)

        def moved(name: str, **labels: str) -> float:
            return _value(after, name, **labels) - _value(before, name, **labels)

        assert moved("meterd_webhooks_total", route="/twilio/voice", status="200") == 1
        assert moved("meterd_webhooks_total", route="/twilio/voice", status="403") == 1
        assert (
            moved(
                "meterd_webhook_signature_failures_total",
                route="/twilio/voice",
                reason="bad_signature",
            )
            == 1
        )
        assert _value(after, "meterd_open_calls", status="menu") == 1  # answered, asking a PIN
        assert _value(after, "meterd_open_calls", status="connected") == 0
        assert _value(after, "meterd_tick_lag_seconds_count", "meterd_tick_lag_seconds") > 0
        for family in (
            "meterd_postings",
            "meterd_payments",
            "meterd_scheduler_job_failures",
            "meterd_scheduler_jobs_running",
        ):
            assert family in after
    finally:
        assert daemon.stop() == 0


def test_db_backup_is_a_consistent_online_copy_with_the_same_ledger(tmp_path):
    daemon = Daemon(tmp_path).start()
    try:
        writes_done = threading.Event()

        def deposit_while_backing_up() -> None:
            for n in range(40):
                account = f"acct{n % 4}"
                if n < 4:
                    status, _ = daemon.admin(
                        "POST",
                        "/admin/accounts",
                        {"account_id": account, "name": account, "plan": "per_minute"},
                    )
                    assert status == 201
                status, _ = daemon.admin(
                    "POST",
                    f"/admin/accounts/{account}/deposits",
                    {"amount_minor": 100 + n, "reference": f"wire-{n}"},
                )
                assert status == 201
            writes_done.set()

        writer = threading.Thread(target=deposit_while_backing_up)
        writer.start()
        online = run_cli(["db", "backup", str(tmp_path / "online.sqlite3")], daemon.env, tmp_path)
        writer.join(60)
        assert writes_done.is_set()
        assert online.returncode == 0, online.stderr
        assert "integrity ok" in online.stdout

        def ledger_check(database: Path | None) -> str:
            env = dict(daemon.env)
            if database is not None:
                env["METERD_DATABASE_URL"] = f"sqlite+aiosqlite:///{database}"
            result = run_cli(["ledger", "check"], env, tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        assert "ledger OK" in ledger_check(tmp_path / "online.sqlite3")  # a consistent snapshot

        quiet = run_cli(["db", "backup", str(tmp_path / "quiet.sqlite3")], daemon.env, tmp_path)
        assert quiet.returncode == 0, quiet.stderr
        original = ledger_check(None)
        assert "checked 40 transactions" in original  # the 40 deposits
        assert ledger_check(tmp_path / "quiet.sqlite3") == original
        assert (tmp_path / "quiet.sqlite3").stat().st_mode & 0o077 == 0

        again = run_cli(["db", "backup", str(tmp_path / "quiet.sqlite3")], daemon.env, tmp_path)
        assert again.returncode == 1 and "exists" in again.stderr
    finally:
        assert daemon.stop() == 0


def test_db_backup_refuses_postgresql_and_points_to_pg_dump(tmp_path):
    result = run_cli(
        ["db", "backup", str(tmp_path / "copy")],
        {"METERD_DATABASE_URL": "postgresql+asyncpg://meterd@db.invalid/meterd"},
        tmp_path,
    )
    assert result.returncode == 2
    assert "pg_dump" in result.stderr
    assert not (tmp_path / "copy").exists()
