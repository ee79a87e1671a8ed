"""Drive a running meterd exactly as Twilio and a support desk would, and check every charge.

    python -m meterd.simulate --url http://127.0.0.1:8080 --calls 200 --cps 20 \
        [--duplicates] [--reorder] [--seed N] [--time-scale 0]

The simulator sets up its own accounts (per_minute paid from banked minutes, from a prepaid deposit,
and from both; a service agreement; per_incident), then places N calls at `cps` new calls per
second. Each call is what Twilio would send for the topology in docs/twilio-setup.md: the signed
voice webhook (and the PIN `<Gather>` for a withheld number), the conference status callbacks
(customer and 1 to `agents_max` agents labelled `agent:<id>`, holds of the customer and of agents,
an agent re-dialling), the customer leg's `completed` status callback; some callers hang up in the
menu (a `completed` before any conference event). Agents flag research through `/agents/research`
(retroactive intervals during the call, start/stop after the caller hung up) and waive some calls
(during the call and after settlement). With `--duplicates` some requests are delivered twice (at
the same moment, or later); with `--reorder` the callbacks of a call arrive shuffled.

Timing: with `--time-scale 0` (the default) nothing waits. Twilio's `Timestamp`s are synthetic:
each call is placed in the recent past, ending `settle_delay` seconds before it is delivered, so
meterd settles it at its next tick. A call's callbacks that change its timeline are delivered
before the ones that end it (a callback arriving after settlement no longer changes charges: the
rules' settle delay exists for exactly that). With `--time-scale S` > 0 each callback is sent
S x its offset after the call began (1 = real time, live metering included), its Timestamp never
ahead of the clock.

The simulator keeps its own expectation of every call, worked out second by second from the
scenario by the rules of docs/billing.md (active, research, billable, hold; whole minutes
rounded up; plan and funding), without any of meterd's code. It waits for meterd to settle every
call, reads each back (`GET /admin/calls/{sid}`, and the call's ledger), compares, checks the
accounts' balances, prints a summary and exits 0 when everything matched, 1 listing every
difference otherwise, 2 when it could not run (bad arguments, meterd unreachable, setup refused).

Tokens: `--twilio-auth-token`, `--admin-token`, `--agents-token`, `--public-base-url` or
METERD_TWILIO_AUTH_TOKEN, METERD_ADMIN_TOKEN, METERD_AGENTS_TOKEN, METERD_PUBLIC_BASE_URL; those
not given are read from the daemon's state directory, `<dir>/secrets/<name>` (`--state-dir DIR`,
else, under `meterd simulate`, the `state_dir` setting): the admin and agents tokens meterd
generated there, and a `twilio_auth_token` file if one was put there (`meterd demo` does).

The package, by job: `wire` (Twilio's payloads and signature, shared with the tests and
benchmarks), `scenarios` (the plan of every call), `expectation` (the rules, counted second by
second), `client` (HTTP to meterd; the run's accounts), `playback` (a call's requests, sent),
`readback` (settled calls and accounts, compared), `summary` (progress and tables), `run` (the
whole run), `arguments` and `command` (the command line). Nothing of it is imported until used:
the names below are loaded from their module on first access, so `meterd`'s parser (which needs
only `add_arguments`) does not load the simulator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meterd.simulate.arguments import add_arguments
    from meterd.simulate.command import main, run_parsed
    from meterd.simulate.run import simulate
    from meterd.simulate.wire import sign

__all__ = ["add_arguments", "main", "run_parsed", "sign", "simulate"]

_HOMES = {
    "add_arguments": "arguments",
    "main": "command",
    "run_parsed": "command",
    "sign": "wire",
    "simulate": "run",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
