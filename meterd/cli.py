"""The `meterd` command. Its exit statuses (`EXIT_STATUSES`, listed in `meterd --help`): 0 ok,
1 failure (the daemon could not start, a command failed, a ledger breach, a simulated call
charged otherwise than expected), 2 bad settings or arguments (nothing written), 3 the daemon
stopped on a broken money invariant, 130 interrupted.

`--config FILE` is accepted before the command and after it (`meterd run --config FILE`), at
every level."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meterd.clock import system_clock
from meterd.config import ConfigError, Settings, load_settings
from meterd.files import fsync_file, replace_durably
from meterd.logs import configure_logging

EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
EXIT_INVARIANT_BROKEN = 3  # meterd.daemon.EXIT_INVARIANT_BROKEN (not imported: --help stays fast)
EXIT_INTERRUPTED = 130

EXIT_STATUSES = f"""exit status:
  0    success
  {EXIT_FAILED}    failure: the daemon could not start (database unreachable, address in use),
       a command failed, `ledger check` found a breach, `simulate` or `demo` found a call
       charged otherwise than expected
  {EXIT_BAD_SETTINGS}    bad settings (the message names the setting; nothing was written) or bad
       arguments; `simulate`: could not run
  {EXIT_INVARIANT_BROKEN}    `run` stopped because a money invariant broke
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""

CONFIG_HELP = (
    "TOML settings file (default: $METERD_CONFIG, else built-in defaults); accepted before or "
    "after the command"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meterd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _config_option(help_text: str = CONFIG_HELP) -> argparse.ArgumentParser:
    """`--config` for a command: SUPPRESS, so that one given before the command stands unless
    it is given again after it."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, metavar="FILE", help=help_text
    )
    return parent


def _commands(parser: argparse.ArgumentParser, dest: str) -> Callable[..., argparse.ArgumentParser]:
    """A function adding one command to `parser`: with its help (the one-line summary), its
    description (the command's own --help) and the --config option."""
    group = parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")

    def add(
        name: str,
        summary: str,
        description: str | None = None,
        config_help: str = CONFIG_HELP,
    ) -> argparse.ArgumentParser:
        return group.add_parser(
            name,
            help=summary,
            description=description or summary[0].upper() + summary[1:] + ".",
            parents=[_config_option(config_help)],
        )

    return add


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterd",
        description="Telephony call-metering daemon: Twilio webhooks in, a double-entry ledger\n"
        "of agent-minutes and money out. New here? `meterd demo` shows it working.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    command = _commands(parser, "command")
    command(
        "run",
        "run the daemon",
        "Run the daemon: migrate the database, serve HTTP, run the scheduled jobs; stop "
        "cleanly on SIGTERM or SIGINT.",
    )
    _add_db_commands(command("db", "database maintenance"))
    ledger = _commands(command("ledger", "ledger tools"), "ledger_command")
    ledger("check", "re-sum every balance and check every invariant; exit 1 on any breach")
    _add_usage_command(command)
    reconcile = command(
        "reconcile",
        "compare a closed business day's calls with Twilio's own call records and print the "
        "report (JSON, or CSV with --format csv); exit 1 if anything does not match",
    )
    reconcile.add_argument(
        "--date", required=True, type=_business_day, help="the business day, YYYY-MM-DD"
    )
    reconcile.add_argument(
        "--format", choices=["json", "csv"], default="json", help="what to print (default json)"
    )
    _add_account_commands(command("account", "manage accounts"))
    _add_simulate_and_demo(command)
    return parser


def _add_db_commands(db_parser: argparse.ArgumentParser) -> None:
    """`meterd db upgrade`, `meterd db backup PATH`."""
    db = _commands(db_parser, "db_command")
    db("upgrade", "apply every pending migration")
    backup = db(
        "backup",
        "write a consistent copy of the SQLite database to PATH, while meterd runs "
        "(PostgreSQL: use pg_dump)",
    )
    backup.add_argument("path", type=Path, help="the copy to write (a new file)")
    backup.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")


def _add_usage_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    usage = command(
        "usage",
        "print a closed business day's usage per account (building it if the nightly job "
        "has not); the per-call file's path goes to stderr",
    )
    usage.add_argument(
        "--date", required=True, type=_business_day, help="the business day, YYYY-MM-DD"
    )
    usage.add_argument(
        "--format", choices=["csv", "json"], default="csv", help="what to print (default csv)"
    )
    usage.add_argument(
        "--regenerate",
        action="store_true",
        help="build the day again from the ledger and check it is byte-identical to what was "
        "published",
    )


def _add_account_commands(account_parser: argparse.ArgumentParser) -> None:
    """`meterd account add|show|list|deposit|grant-minutes`."""
    account = _commands(account_parser, "account_command")
    _add_account_add(account("add", "create an account"))
    show = account("show", "show an account as JSON")
    show.add_argument("account_id", help="the account's id")
    account("list", "list account ids")
    deposit = account("deposit", "money into the prepaid deposit")
    deposit.add_argument("account_id", help="the account's id")
    deposit.add_argument(
        "--amount-minor", type=int, required=True, help="the amount, in minor units (cents)"
    )
    deposit.add_argument(
        "--reference", required=True, help="names the payment; the same reference never posts twice"
    )
    grant = account("grant-minutes", "minutes into the bank")
    grant.add_argument("account_id", help="the account's id")
    grant.add_argument("--minutes", type=int, required=True, help="how many agent-minutes")
    grant.add_argument(
        "--reference", required=True, help="names the grant; the same reference never posts twice"
    )


def _add_account_add(add: argparse.ArgumentParser) -> None:
    add.add_argument("account_id", help="the new account's id")
    add.add_argument("--name", required=True, help="the customer's name")
    add.add_argument(
        "--plan",
        required=True,
        choices=["service_agreement", "per_incident", "per_minute"],
        help="how its calls are charged",
    )
    add.add_argument(
        "--fallback-plan",
        choices=["per_incident", "per_minute"],
        help="the plan once a service agreement has ended",
    )
    add.add_argument("--caller-id", action="append", default=[], help="E.164 number; repeatable")
    add.add_argument("--pin", help="PIN for callers whose number is withheld or unknown")
    add.add_argument("--currency", help="ISO 4217 code (default: the currency setting)")
    add.add_argument("--valid-until", help="service agreement end date, YYYY-MM-DD")
    add.add_argument(
        "--product",
        action="append",
        default=[],
        help="PRODUCT:KIND[:UNTIL], e.g. desktop:license:2027-06-30 (UMP end) or "
        "web:subscription; repeatable",
    )


def _add_simulate_and_demo(command: Callable[..., argparse.ArgumentParser]) -> None:
    from meterd import demo, simulate

    sim = command(
        "simulate",
        "drive a running meterd with signed simulated Twilio traffic and check every "
        "call's charges (exit 1 on a difference)",
        "Drive a running meterd with signed simulated Twilio traffic, as Twilio and a support "
        "desk would, and check every call's charges against the rules (exit 1 on a "
        "difference, 2 if it cannot run). Address and tokens come from the settings and the "
        "daemon's state directory unless given.",
    )
    simulate.add_arguments(sim)
    show_it = command(
        "demo",
        demo.SUMMARY,
        demo.DESCRIPTION,
        config_help="ignored: the demo makes its own throw-away settings",
    )
    demo.add_arguments(show_it)


def _product(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--product {text!r}: expected PRODUCT:KIND[:UNTIL]")
    product: dict[str, Any] = {"product": parts[0], "kind": parts[1]}
    if len(parts) == 3:
        product["ump_until" if parts[1] == "license" else "active_until"] = parts[2]
    return product


PRIVATE_UMASK = 0o077


def main(argv: list[str] | None = None) -> int:
    # Every file meterd makes is private to its user: the state directory, the SQLite file and
    # the -wal and -shm files SQLite makes beside it, generated tokens, usage files. (The systemd
    # unit says UMask=0077 too; this covers every other way of starting meterd.)
    previous_umask = os.umask(PRIVATE_UMASK)
    try:
        return _main(argv)
    finally:
        os.umask(previous_umask)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":  # its own throw-away settings and state directory
        from meterd.demo import run_demo

        try:
            return run_demo(args)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    config_path = args.config or (
        Path(os.environ["METERD_CONFIG"]) if os.environ.get("METERD_CONFIG") else None
    )
    try:
        # a client of a running daemon reads its tokens and never generates any
        settings = load_settings(config_path, generate_secrets=args.command != "simulate")
    except ConfigError as error:
        print(f"meterd: {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if args.command == "simulate":
        from meterd.simulate import run_parsed

        try:
            return run_parsed(args, settings)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    # the daemon logs to stdout (the journal); every other command prints its answer there
    # (JSON, CSV), so its log goes to stderr
    configure_logging(
        settings.log_level, stream=sys.stdout if args.command == "run" else sys.stderr
    )
    _warn_about_secret_modes(settings)
    try:
        return asyncio.run(_dispatch(args, settings))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _warn_about_secret_modes(settings: Settings) -> None:
    if not settings.secret_modes_fixed:
        return
    from meterd.logs import get_logger

    get_logger("meterd.config").warning(
        "the secrets directory was open to other users: made it private; whoever could read it "
        "may have the tokens: rotate them unless you are sure nobody did (README, Operations, "
        "File modes)",
        fixed=[
            {"path": str(path), "mode_was": f"{was:04o}", "mode": f"{now:04o}"}
            for path, was, now in settings.secret_modes_fixed
        ],
    )


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        from meterd.daemon import serve

        return await serve(settings)
    if args.command == "db" and args.db_command == "backup":
        return await asyncio.to_thread(_backup, settings, args.path, overwrite=args.overwrite)
    return await _with_database(settings, lambda database: _offline(args, settings, database))


async def _with_database(settings: Settings, work: Callable[[Any], Awaitable[int]]) -> int:
    from meterd import bootstrap

    async with bootstrap.database(settings) as database:
        return await work(database)


def _backup(settings: Settings, destination: Path, *, overwrite: bool) -> int:
    """Copy the SQLite database with sqlite3's online backup API: one read transaction, so the
    copy is a consistent snapshot while the daemon goes on writing (WAL). The copy is written
    beside PATH (mode 0600), checked, made self-contained (no -wal file), then renamed into place.
    Never migrates or otherwise changes the database."""
    from meterd.store.sqlite_backup import BackupFailed, copy_database, sqlite_file

    database_file = sqlite_file(settings.database_url)
    if database_file is None:
        print(
            "meterd: db backup copies a SQLite database, and this one is PostgreSQL; back it "
            "up with pg_dump, e.g. pg_dump --format=custom --file=meterd.dump "
            "'postgresql://USER@HOST/DB' (README, Operations)",
            file=sys.stderr,
        )
        return EXIT_BAD_SETTINGS
    source = Path(database_file)
    if not database_file or database_file == ":memory:" or not source.is_file():
        print(f"meterd: there is no SQLite database at {source}", file=sys.stderr)
        return EXIT_FAILED
    destination = destination.absolute()
    if destination.resolve() == source.resolve():
        print("meterd: the backup must not be the database itself", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if destination.exists() and not overwrite:
        print(
            f"meterd: {destination} exists; choose a new name or pass --overwrite", file=sys.stderr
        )
        return EXIT_FAILED
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        pages = copy_database(
            source, temporary, busy_timeout_seconds=settings.sqlite_busy_timeout_ms / 1000
        )
        fsync_file(temporary)
        replace_durably([(temporary, destination)])
    except (OSError, BackupFailed) as error:
        temporary.unlink(missing_ok=True)
        print(f"meterd: backup to {destination} failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"backed up {source} to {destination} ({pages} pages, integrity ok)")
    return 0


async def _offline(args: argparse.Namespace, settings: Settings, database: Any) -> int:
    from meterd import bootstrap
    from meterd.services.errors import ServiceError
    from meterd.services.ledger_check import check_ledger

    if args.command == "db":
        print("database is at the newest migration")
        return 0
    if args.command == "ledger":
        report = await check_ledger(database)
        print(
            f"checked {report.transactions} transactions, {report.postings} postings, "
            f"{report.books} books"
        )
        for breach in report.breaches:
            print(f"BREACH [{breach.invariant}] {breach.detail}")
        print("ledger OK" if report.ok else f"ledger BROKEN: {len(report.breaches)} breach(es)")
        return 0 if report.ok else EXIT_FAILED
    if args.command == "usage":
        return await _usage(args, settings, database)
    if args.command == "reconcile":
        return await _reconcile(args, settings, database)

    accounts = bootstrap.account_service(settings, database, system_clock)
    try:
        result: Any
        if args.account_command == "add":
            body: dict[str, Any] = {
                "account_id": args.account_id,
                "name": args.name,
                "plan": args.plan,
                "caller_ids": args.caller_id,
                "products": [_product(p) for p in args.product],
            }
            for field in ("fallback_plan", "pin", "currency", "valid_until"):
                if getattr(args, field) is not None:
                    body[field] = getattr(args, field)
            result = await accounts.create(body)
        elif args.account_command == "show":
            result = await accounts.view(args.account_id)
        elif args.account_command == "list":
            result = await accounts.list_ids()
        elif args.account_command == "deposit":
            result = (
                await accounts.deposit(
                    args.account_id,
                    {"amount_minor": args.amount_minor, "reference": args.reference},
                )
            ).__dict__
        else:
            result = (
                await accounts.grant_minutes(
                    args.account_id, {"minutes": args.minutes, "reference": args.reference}
                )
            ).__dict__
    except (ServiceError, argparse.ArgumentTypeError) as error:
        print(f"meterd: {getattr(error, 'detail', error)}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _business_day(text: str) -> Any:
    from meterd.core.usage import InvalidBusinessDay, parse_business_day

    try:
        return parse_business_day(text)
    except InvalidBusinessDay as error:
        raise argparse.ArgumentTypeError(str(error)) from None


async def _usage(args: argparse.Namespace, settings: Settings, database: Any) -> int:
    """`meterd usage`: the day's per-account file on stdout, byte for byte (its log went to
    stderr: `main`)."""
    from meterd import bootstrap
    from meterd.services.usage import UsageFile, UsageMismatch, UsageNotReady, UsageRefused

    usage = bootstrap.usage_service(settings, database, system_clock)
    try:
        await usage.build(args.date, regenerate=args.regenerate)
    except (UsageNotReady, UsageRefused, UsageMismatch) as error:
        print(f"meterd: {error}", file=sys.stderr)
        return EXIT_FAILED
    kind = UsageFile.ACCOUNTS_JSON if args.format == "json" else UsageFile.ACCOUNTS_CSV
    sys.stdout.flush()
    sys.stdout.buffer.write(usage.path(args.date, kind).read_bytes())
    sys.stdout.buffer.flush()
    if args.regenerate:
        print(
            f"{args.date}: rebuilt from the ledger, identical to what was published",
            file=sys.stderr,
        )
    print(f"per call: {usage.path(args.date, UsageFile.CALLS_CSV)}", file=sys.stderr)
    return 0


async def _reconcile(args: argparse.Namespace, settings: Settings, database: Any) -> int:
    """`meterd reconcile`: the day against Twilio's records, kept for finance and printed."""
    from meterd import bootstrap
    from meterd.adapters.twilio_rest import TwilioRestError
    from meterd.services.reconciliation import (
        ReconciliationOff,
        ReconciliationService,
        report_csv,
    )
    from meterd.services.usage import UsageNotReady

    twilio = bootstrap.twilio_rest(settings)
    service = ReconciliationService(
        database,
        system_clock,
        twilio,
        bootstrap.usage_service(settings, database, system_clock),
        bootstrap.alert_service(settings, database, system_clock),
        tolerance_seconds=settings.reconcile_tolerance_seconds,
    )
    try:
        report = await service.run(args.date)
    except (ReconciliationOff, UsageNotReady, TwilioRestError) as error:
        print(f"meterd: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if twilio is not None:
            await twilio.close()
    print(report_csv(report) if args.format == "csv" else json.dumps(report, indent=2), end="")
    if args.format == "json":
        print()
    return 0 if report["clean"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
