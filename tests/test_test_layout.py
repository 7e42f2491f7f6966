"""The test suite's own layout: shared code lives in ``tests/helpers`` (and ``tests/scripts``),
so no test module imports another (a fixture imported from a test module runs twice)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """The ``test_*`` modules that ``source`` imports, as written."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found += [name for name in names if name.rsplit(".", 1)[-1].startswith("test_")]
    return found


def test_the_check_sees_each_form_of_import():
    for line in ("import tests.test_cli", "from tests.test_cli import ROOT",
                 "from tests import test_cli", "from .test_cli import x", "from . import test_cli",
                 "def f():\n    from tests.test_module import _trainer"):  # fmt: skip
        assert imported_test_modules(line), line
    assert not imported_test_modules("from tests.helpers.fit import fit\nimport pytest")


def test_no_test_module_imports_another():
    offenders = {
        str(path.relative_to(TESTS)): names
        for path in sorted(TESTS.rglob("*.py"))
        if (names := imported_test_modules(path.read_text()))
    }
    assert not offenders, f"move what they share to tests/helpers: {offenders}"


def imported_tests_modules(source: str) -> list[str]:
    """The ``tests.*`` modules ``source`` imports by absolute name, at any depth (a lazy import
    inside a worker function fails only in the worker, after the test started)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("tests.")]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("tests.")
        ):
            found.append(node.module)
    return found


def test_every_imported_tests_module_exists():
    """A helper moved (e.g. to tests/helpers/) must not leave imports of its old path."""
    root = TESTS.parent
    missing = {
        f"{path.relative_to(TESTS)}: {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in imported_tests_modules(path.read_text())
        if not (root / (name.replace(".", "/") + ".py")).exists()
        and not (root / name.replace(".", "/") / "__init__.py").exists()
    }
    assert not missing, f"imports of test modules that do not exist: {sorted(missing)}"
