"""Imports point inward (README, Layout): every module under meterd/ is parsed with `ast`, nothing
is imported, and

- meterd.core imports nothing of meterd outside meterd.core;
- meterd.store never imports meterd.services or meterd.web;
- meterd.services never imports meterd.web;
- meterd.bootstrap (which builds the services) never imports meterd.web;
- no two meterd modules import each other, directly or round a longer circle.

Every import counts, wherever it is written: at module level, in class bodies, in `try`, `if`
and `if TYPE_CHECKING:` blocks, and inside functions. Imports inside functions are not exempt from
the cycle rule either: a lazy import is a fine way to keep `meterd --help` fast (meterd.cli), but
not to hide a cycle (meterd.web.app once imported its route modules inside `create_app` while they
imported it back). A `TYPE_CHECKING` import never runs, and a cycle through one is still a cycle in
the design.

`from package import name` counts as importing `package.name` when that is a module, else
`package`. Importing a module imports its parent packages too; for the cycle rule that counts
from outside a package only: inside it, the package is already being imported (a submodule
importing a sibling makes no cycle with the `__init__` that imports both).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "meterd"
ROOT = "meterd"


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)  # the meterd modules it imports


def _modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    # packages first: a directory package wins over a module of the same name, as in Python
    paths = sorted(SOURCE.rglob("*.py"), key=lambda path: path.name != "__init__.py")
    for path in paths:
        parts = (ROOT, *path.relative_to(SOURCE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules.setdefault(name, Module(name, path, is_package))
    for module in modules.values():
        _read_imports(module, modules)
    return modules


def _read_imports(module: Module, modules: dict[str, Module]) -> None:
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module.imports.update(_targets(node, module, modules))


def _targets(
    node: ast.Import | ast.ImportFrom, module: Module, modules: dict[str, Module]
) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if _is_meterd(alias.name)}
    base = node.module or ""
    if node.level:  # relative: from the module's package, up level - 1 packages
        package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    if not _is_meterd(base):
        return set()
    names = {f"{base}.{alias.name}" for alias in node.names}
    found = {name for name in names if name in modules}
    return found if len(found) == len(names) else found | {base}


def _is_meterd(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


MODULES = _modules()


def test_the_parser_sees_meterd():
    """A guard: the modules and imports below are found (an empty graph passes every rule)."""
    assert len(MODULES) > 40
    assert {"meterd.core.ledger", "meterd.web.app", "meterd.bootstrap"} <= MODULES.keys()
    assert "meterd.bootstrap" in MODULES["meterd.web.app"].imports
    assert "meterd.core.ledger" in MODULES["meterd.store.ledger_store"].imports
    assert "meterd.daemon" in MODULES["meterd.cli"].imports  # inside a function


def _breaches(importer_package: str, forbidden: list[str]) -> list[str]:
    return sorted(
        f"{module.name} imports {target}"
        for module in MODULES.values()
        if _within(module.name, importer_package)
        for target in module.imports
        if any(_within(target, package) for package in forbidden)
    )


def test_core_imports_nothing_of_meterd_outside_core():
    outside = sorted(
        f"{module.name} imports {target}"
        for module in MODULES.values()
        if _within(module.name, "meterd.core")
        for target in module.imports
        if not _within(target, "meterd.core")
    )
    assert outside == []


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("meterd.store", ["meterd.services", "meterd.web"]),
        ("meterd.services", ["meterd.web"]),
        ("meterd.bootstrap", ["meterd.web"]),
    ],
)
def test_imports_point_inward(importer, forbidden):
    assert _breaches(importer, forbidden) == []


def test_no_import_cycles():
    graph = {
        module.name: {
            dependency
            for target in module.imports
            for dependency in (
                target,
                *(parent for parent in _parents(target) if not _within(module.name, parent)),
            )
            if dependency in MODULES and dependency != module.name
        }
        for module in MODULES.values()
    }
    cycles = [sorted(component) for component in _strongly_connected(graph) if len(component) > 1]
    assert cycles == [], "\n".join(_describe(cycle, graph) for cycle in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def _describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    members = set(cycle)
    edges = [f"  {a} -> {b}" for a in cycle for b in sorted(graph[a] & members)]
    return "import cycle among " + ", ".join(cycle) + ":\n" + "\n".join(edges)


def test_the_cycle_check_finds_a_cycle():
    """A guard for the check itself: a -> b -> c -> a is one cycle, d alone is none."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert [sorted(c) for c in _strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]
