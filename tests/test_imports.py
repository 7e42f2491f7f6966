"""Every subpackage and every module of lightning_kd imports on its own.

One interpreter per subpackage (third-party imports are paid once); before each of the
subpackage's modules it forgets every ``lightning_kd`` module, so each is imported as if it were
the first thing a fresh interpreter imported (a circular import between packages shows up only
then). ``lightning_kd.losses`` is imported with Lightning blocked: it is plain PyTorch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_kd"
#: Imported by ``python -m lightning_kd`` only (importing it runs the command line).
NOT_IMPORTABLE = {"lightning_kd.__main__"}
BLOCK_LIGHTNING = (
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics'):\n"
    "            raise ImportError('blocked: ' + name)\n"
    "sys.meta_path.insert(0, Block())\n"
)
IMPORT_EACH = (
    "import importlib, json, sys, traceback\n"
    "{block}"
    "failed = []\n"
    "for name in {names!r}:\n"
    "    for key in [k for k in sys.modules if k.split('.')[0] == 'lightning_kd']:\n"
    "        del sys.modules[key]\n"
    "    try:\n"
    "        importlib.import_module(name)\n"
    "    except BaseException:\n"
    "        failed.append(name + ':\\n' + traceback.format_exc(limit=-4))\n"
    "{check}"
    "print(json.dumps(failed))\n"
)
NO_LIGHTNING = (
    "    if any(m.split('.')[0] == 'lightning' for m in sys.modules):\n"
    "        failed.append(name + ': imported lightning')\n"
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _groups() -> dict[str, list[str]]:
    """Subpackage (or ``lightning_kd`` for the top-level modules) → its modules, package first."""
    groups: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name in NOT_IMPORTABLE:
            continue
        parts = name.split(".")
        is_subpackage = len(parts) > 2 or (PACKAGE / parts[-1]).is_dir()
        group = ".".join(parts[:2]) if is_subpackage and len(parts) > 1 else "lightning_kd"
        groups.setdefault(group, []).append(name)
    return {group: sorted(names, key=lambda n: (n != group, n)) for group, names in groups.items()}


def import_each(names: list[str], block_lightning: bool = False) -> list[str]:
    """Import each module in one fresh interpreter, forgetting lightning_kd before each one;
    returns the failures (module name and traceback tail)."""
    code = IMPORT_EACH.format(
        names=names,
        block=BLOCK_LIGHTNING if block_lightning else "",
        check=NO_LIGHTNING if block_lightning else "",
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


GROUPS = _groups()


#: The group of issue 21's hole 4 (a circular import) runs in ``make test-fast``; the others
#: take one interpreter start each and are marked slow.
FAST_GROUPS = {"lightning_kd.teacher_cache"}


@pytest.mark.parametrize(
    "group",
    [
        pytest.param(group, marks=() if group in FAST_GROUPS else pytest.mark.slow)
        for group in sorted(GROUPS)
    ],
)
def test_each_module_imports_on_its_own(group, import_runs):
    failed = import_runs[group].result()
    assert failed == [], "\n\n".join(failed)


@pytest.fixture(scope="module")
def import_runs(request) -> Iterator[dict[str, Future]]:
    """The selected groups' interpreters, two at a time (an import is single-threaded; the
    machine has two cores), started when the first group's test runs."""
    selected = [
        item.callspec.params["group"]
        for item in request.session.items
        if item.originalname == "test_each_module_imports_on_its_own"
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {
            group: pool.submit(import_each, GROUPS[group], group == "lightning_kd.losses")
            for group in selected
        }


def test_every_subpackage_is_checked():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {f"lightning_kd.{name}" for name in subpackages} <= set(GROUPS)
    assert "lightning_kd.teacher_cache.writer" in GROUPS["lightning_kd.teacher_cache"]


def test_the_check_finds_a_circular_import(tmp_path):
    """Two modules that import each other's names fail when either is imported first."""
    pkg = tmp_path / "circ"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circ.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from circ.a import A\nB = 2\n")
    code = IMPORT_EACH.format(names=["circ.a"], block="", check="").replace(
        "'lightning_kd'", "'circ'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(failed) == 1 and "circular import" in failed[0], failed


@pytest.mark.slow
def test_losses_import_with_lightning_blocked_is_checked():
    """The Lightning block is real: a module that imports Lightning is reported."""
    failed = import_each(["lightning_kd.lightning_private"], block_lightning=True)
    assert len(failed) == 1 and "blocked: lightning" in failed[0], failed
