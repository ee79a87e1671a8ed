"""`meterd demo`: see meterd work in one command, touching nothing of yours.

It makes a throw-away state directory (`tempfile`, mode 0700) holding a settings file (a free
loopback port, a 2-second settle delay, the embedded SQLite) and a locally generated Twilio auth
token, starts `meterd run` on it (which generates its own tokens there), runs `meterd simulate`
against it (which reads every token from that directory), shows a couple of calls as the admin
API sees them, says where the usage report and the tokens are, stops the daemon with SIGTERM
(it must exit 0) and removes the directory (`--keep` keeps it; so does a failure, for a look).

The daemon and the simulator run with none of the caller's METERD_* variables, systemd
credentials or state directory: nothing outside the throw-away directory is read or written.
Exit status: 0 when every call matched and the daemon stopped cleanly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from meterd.config import SECRETS, write_new_secret

SUMMARY = "see it work: a throw-away daemon, simulated calls, every charge checked"
DESCRIPTION = (
    "Start a throw-away meterd (a temporary state directory, a free loopback port, the "
    "embedded SQLite, generated tokens including a local Twilio auth token), run `meterd "
    "simulate` against it, print its summary and where to look (calls, usage report, tokens), "
    "then stop the daemon with SIGTERM and remove the directory (unless --keep). Ignores "
    "--config and METERD_* settings. Exit 0 when every call matched, 1 otherwise."
)
SETTLE_DELAY_SECONDS = 2
MAX_CALL_SECONDS = 600
SETTLE_TIMEOUT_SECONDS = 30
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 40  # above shutdown_timeout_seconds (20)
CALLS_SHOWN = 2
EXIT_OK, EXIT_FAILED = 0, 1
# what the caller's environment must not pass on to the demo's daemon and simulator
FOREIGN_VARIABLES = ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calls", type=int, default=20, help="how many simulated calls (default 20)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="scenario seed, to replay a run (default: random)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the state directory (database, tokens, log, settings) instead of removing it",
    )


class Demo:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.config = directory / "meterd.toml"
        self.log = directory / "meterd.log"
        self.secrets = directory / "secrets"
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("METERD_") and name not in FOREIGN_VARIABLES
        }
        self.daemon: subprocess.Popen[bytes] | None = None

    def write_settings(self) -> None:
        self.config.write_text(
            "# meterd demo: a throw-away daemon (see `meterd demo --help`)\n"
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n'
            f"[storage]\nstate_dir = {json.dumps(str(self.directory))}\n"
            f"[billing]\nsettle_delay_seconds = {SETTLE_DELAY_SECONDS}\n"
        )
        # Twilio's auth token, made up here: the simulator signs its webhooks with it
        write_new_secret(self.secrets / "twilio_auth_token")

    def token(self, name: str) -> str:
        return (self.secrets / name).read_text().strip()

    def meterd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "meterd", "--config", str(self.config), *args]

    def start(self) -> str | None:
        """Start `meterd run`; None once it is healthy, else what went wrong."""
        env = {**self.env, "METERD_TWILIO_AUTH_TOKEN": self.token("twilio_auth_token")}
        with self.log.open("ab") as log:
            self.daemon = subprocess.Popen(
                self.meterd("run"),
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        health = f"{self.base_url}/healthz"  # loopback http, built here: S310 below
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                return f"meterd run exited {self.daemon.returncode} while starting"
            try:
                with urllib.request.urlopen(health, timeout=2) as answer:  # noqa: S310
                    if answer.status == 200:
                        return None
            except OSError:
                pass
            time.sleep(0.1)
        return f"meterd run was not healthy within {START_TIMEOUT_SECONDS} s"

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; its exit status (killed if it does not stop)."""
        if self.daemon is None:
            return EXIT_OK
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
        try:
            return self.daemon.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            return -signal.SIGKILL

    def admin(self, path: str) -> Any:
        request = urllib.request.Request(  # noqa: S310 (the daemon's loopback http URL)
            self.base_url + path, headers={"Authorization": f"Bearer {self.token('admin_token')}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return json.loads(answer.read())

    def some_calls(self) -> list[dict[str, Any]]:
        """A couple of the busiest simulated calls (the most postings), of different accounts,
        as the admin API shows them."""
        postings: Counter[tuple[str, str]] = Counter()
        for transaction in self.admin("/admin/ledger?limit=500")["transactions"]:
            if transaction["call_sid"] and transaction["account_id"]:
                postings[transaction["call_sid"], transaction["account_id"]] += 1
        chosen: dict[str, str] = {}  # account -> call sid
        for (sid, account), _ in postings.most_common():
            chosen.setdefault(account, sid)
            if len(chosen) == CALLS_SHOWN:
                break
        return [self.admin(f"/admin/calls/{sid}") for sid in chosen.values()]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _describe(view: dict[str, Any]) -> str:
    minutes = sum(agent["agent_minutes"] for agent in view["agents"].values())
    charges = view["charges"]
    return (
        f"account {view['account_id']} ({view['plan']}), {len(view['agents'])} agent(s), "
        f"{minutes} agent-minute(s); charged {charges['bank_minutes']} bank minute(s), "
        f"{charges['deposit_minor'] / 100:.2f} from the deposit, {charges['incidents']} "
        f"incident(s){', waived' if charges['waived'] else ''}"
    )


def run_demo(args: argparse.Namespace) -> int:
    if args.calls < 1:
        print("meterd demo: --calls must be at least 1", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="meterd-demo-")).resolve()
    demo = Demo(directory, _free_port())
    status = EXIT_FAILED
    try:
        status = _run(demo, args)
    finally:
        if demo.daemon is not None and demo.daemon.poll() is None:
            stopped = demo.stop()
            print(f"stopped meterd (SIGTERM): exit status {stopped}")
            if stopped != EXIT_OK:
                status = EXIT_FAILED
                print(f"meterd did not stop cleanly; its log ends:\n{demo.log_tail()}")
        _put_away(demo, keep=args.keep or status != EXIT_OK)
    return status


def _run(demo: Demo, args: argparse.Namespace) -> int:
    out = demo.directory
    print(f"meterd demo: a throw-away meterd in {out}")
    demo.write_settings()
    started = time.monotonic()
    problem = demo.start()
    if problem is not None:
        print(f"meterd demo: {problem}; its log ends:\n{demo.log_tail()}")
        return EXIT_FAILED
    print(
        f"started `meterd --config {demo.config} run` on {demo.base_url} "
        f"(healthy in {time.monotonic() - started:.1f} s; log: {demo.log})"
    )
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    simulate = [
        "simulate",
        *("--calls", str(args.calls), "--cps", "20", "--seed", str(seed)),
        *("--max-call-seconds", str(MAX_CALL_SECONDS)),
        *("--settle-timeout", str(SETTLE_TIMEOUT_SECONDS)),
    ]
    print(
        f"running `meterd --config {demo.config} {' '.join(simulate)}` "
        f"(its tokens read from {demo.secrets})\n",
        flush=True,
    )
    simulated = subprocess.run(
        demo.meterd(*simulate), cwd=demo.directory, env=demo.env, check=False
    ).returncode
    if simulated != EXIT_OK:
        print(f"\nmeterd demo: the simulation exited {simulated}; meterd's log ends:")
        print(demo.log_tail())
        return EXIT_FAILED
    _where_to_look(demo)
    return EXIT_OK


def _where_to_look(demo: Demo) -> None:
    import datetime as dt

    d, url = demo.directory, demo.base_url
    print("\nWhere to look (the URLs answer while the daemon runs: see --keep)")
    print(
        "  calls, as the admin API shows them "
        f"(header Authorization: Bearer <the token in {d}/secrets/admin_token>):"
    )
    try:
        for view in demo.some_calls():
            print(f"    {url}/admin/calls/{view['call_sid']}")
            print(f"      {_describe(view)}")
    except (OSError, ValueError, KeyError) as error:
        print(f"    (could not read them: {error})")
    print(f"    every posting: {url}/admin/ledger")
    today = dt.datetime.now(dt.UTC).date().isoformat()
    print(
        f"  usage report of business day {today} (UTC), built once the day has closed "
        f"(usage_cron, 00:30):"
    )
    print(f"    files: {d}/usage/{today}.csv, {today}.json, {today}.calls.csv")
    print(f"    HTTP:  {url}/finance/usage/{today}.csv (finance token)")
    print(f"    or:    meterd --config {demo.config} usage --date {today}")
    print(f"  tokens (mode 0600, in {demo.secrets}):")
    names = [s.name for s in SECRETS if (demo.secrets / s.name).exists()]
    print(f"    {', '.join(names)} (twilio_auth_token made up for the demo: it signs the webhooks)")
    print(f"  settings: {demo.config}; daemon log: {demo.log}")


def _put_away(demo: Demo, *, keep: bool) -> None:
    d = demo.directory
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
        print(f"removed {d} (--keep keeps it)")
        return
    print(f"kept {d}; start its daemon again with")
    print(
        f"  METERD_TWILIO_AUTH_TOKEN=$(cat {demo.secrets}/twilio_auth_token) "
        f"meterd --config {demo.config} run"
    )
    print(f"and remove it with: rm -r {d}")
