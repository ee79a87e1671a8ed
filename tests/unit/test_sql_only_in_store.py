"""SQL lives in meterd/store/ only (issue 14): no module outside it imports sqlalchemy. Services
hold a `meterd.store.transaction.Transaction` and call the store's functions.

Every import counts, wherever it is written (module level, functions, TYPE_CHECKING blocks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports_sqlalchemy(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "sqlalchemy" or name.startswith("sqlalchemy.") for name in names):
            return True
    return False


def test_no_module_outside_store_imports_sqlalchemy():
    found = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "meterd").rglob("*.py")
        if not path.relative_to(ROOT / "meterd").as_posix().startswith("store/")
        and _imports_sqlalchemy(path)
    }
    assert found == set(), "move this SQL into meterd/store/"


def test_the_check_sees_every_form_of_import(tmp_path):
    for source in (
        "import sqlalchemy\n",
        "from sqlalchemy import select\n",
        "from sqlalchemy.ext.asyncio import AsyncConnection\n",
        "def f():\n    import sqlalchemy.exc\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sqlalchemy import Row\n",
    ):
        path = tmp_path / "module.py"
        path.write_text(source)
        assert _imports_sqlalchemy(path), source
    path.write_text("from meterd.store.transaction import Transaction\nimport sqlalchemyish\n")
    assert not _imports_sqlalchemy(path)


def test_no_assert_guards_a_runtime_check_in_services_or_store():
    """`python -O` strips asserts: a check the money path relies on raises a named error."""
    found = [
        f"{path.relative_to(ROOT).as_posix()}:{node.lineno}"
        for folder in ("services", "store")
        for path in (ROOT / "meterd" / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Assert)
    ]
    assert found == []
