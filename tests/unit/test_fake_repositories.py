"""The in-memory repositories (tests/fakes/repositories.py) answer the same questions as the
real ones (meterd/store/repositories.py): same classes, same public methods, same parameters.
A method added to one and not the other fails here, so the service unit tests on the fakes keep
testing the code the daemon runs."""

from __future__ import annotations

import inspect

from meterd.store import repositories as real
from tests.fakes import repositories as fake


def _methods(cls: type) -> dict[str, list[tuple[str, object]]]:
    return {
        name: [(p.name, p.kind) for p in inspect.signature(member).parameters.values()]
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


def test_every_repository_has_its_in_memory_twin_method_for_method():
    names = {"CallRepository", "AccountRepository", "LedgerRepository", "CardRepository"}
    names |= {"OutboxRepository"}
    for name in sorted(names):
        assert _methods(getattr(fake, name)) == _methods(getattr(real, name)), name


def test_every_repository_is_reached_the_same_way():
    store = fake.Store()
    assert set(vars(fake.Repositories(store))) == {"calls", "accounts", "ledger", "cards", "outbox"}
    source = inspect.getsource(real.Repositories.__init__)
    for attribute in vars(fake.Repositories(store)):
        assert f"self.{attribute} = " in source
