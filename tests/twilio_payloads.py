"""Builders of realistic Twilio webhook payloads, and an independent request signer, for the
tests: the one implementation, `meterd.simulate.wire` (the simulator and the benchmarks build
their requests with it too), re-exported here whole.

`sign` implements Twilio's documented algorithm itself, without the twilio library, so tests check
meterd against the documentation rather than against the code meterd uses.
"""

from __future__ import annotations

from meterd.simulate import wire
from meterd.simulate.wire import *  # noqa: F403 - this module is the re-export

__all__ = wire.__all__
