"""Imports point down: every ``lightning_kd`` module imports only from its own layer or below.

The layer order is declared in :data:`LAYERS` (lowest first). A module may import from a
package in its own layer or a lower one, never from a higher one, at module level or inside a
function (a lazy import is still a dependency). The check reads every module with ``ast``, so
it runs without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_kd"

#: Lowest first. A package or top-level module of lightning_kd may import from its own layer
#: and the layers below it. ``__init__`` is ``lightning_kd/__init__.py`` (``from lightning_kd
#: import X`` for a name X that is not a module); ``__main__`` is ``python -m lightning_kd``.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Leaves: import no other part of lightning_kd.
    ("compat", "checks", "lightning_private", "io"),
    # Plain PyTorch losses (no Lightning; tests/test_imports.py blocks it).
    ("losses",),
    # The model contract, TinyLlama, Hugging Face models, reading a model's output.
    ("models",),
    # Sampling text from a model (the reference sampler of `lightning-kd generate`).
    ("generation",),
    # On-disk checkpoint layout and durable files (used by parallel, data, teacher_cache).
    ("checkpoint",),
    # Meshes, TP plans, FSDP2, sharded loading.
    ("parallel",),
    # In-process generation with a KV cache (rollouts of on-policy distillation).
    ("rollout",),
    ("data",),
    # The offline teacher: runs the teacher of a (duck-typed) training module.
    ("teacher_cache",),
    # The student as a Hugging Face directory.
    ("export",),
    # Lightning callbacks (ExportOnFitEnd uses the export).
    ("callbacks",),
    # DistillationModule and the parts it composes; reads teacher caches.
    ("training",),
    # Metrics, greedy samples and the report of `lightning-kd evaluate`.
    ("evaluation",),
    # Entry points and the package's own lazy top-level names.
    ("cli", "commands", "generate_cli", "evaluate", "demo", "demo_real", "__main__", "__init__"),
)

#: (importing module, imported module) pairs allowed to point up, each with its reason (none
#: today; a stale entry fails the test below).
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

LAYER_OF = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def module_name(path: Path) -> str:
    """``lightning_kd/a/b.py`` → ``lightning_kd.a.b``; a package's ``__init__`` → the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The entry of :data:`LAYERS` a module belongs to (``lightning_kd`` itself: ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` of every lightning_kd module ``tree`` imports, anywhere in it.

    ``from lightning_kd import X`` counts as importing ``lightning_kd.X`` when X is a module or
    package of lightning_kd, and as importing ``lightning_kd`` (``__init__``) otherwise.
    """
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / f"{sub.replace('.', '/')}.py").exists() or (
                    PACKAGE.parent / sub.replace(".", "/")
                ).is_dir()
                found.append((node.lineno, sub if is_module else target))
    return [(line, name) for line, name in found if name.split(".")[0] == "lightning_kd"]


def upward_imports(files: list[Path]) -> list[tuple[str, str, str]]:
    """``(where, importer, imported)`` for each import of a higher layer."""
    found = []
    for path in files:
        module = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in imported_modules(tree, module, path.name == "__init__.py"):
            source, dest = part_of(module), part_of(target)
            if source not in LAYER_OF or dest not in LAYER_OF or LAYER_OF[dest] > LAYER_OF[source]:
                found.append((f"{path.relative_to(PACKAGE.parent)}:{line}", module, target))
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_layer():
    parts = {part_of(module_name(p)) for p in _package_files()}
    missing = sorted(parts - set(LAYER_OF))
    assert missing == [], f"add these to LAYERS in tests/test_layering.py: {missing}"


def test_imports_point_down():
    found = [
        f"{where}: {importer} imports {imported}"
        for where, importer, imported in upward_imports(_package_files())
        if (importer, imported) not in ALLOWED_UPWARD
    ]
    assert found == [], "imports of a higher layer (see LAYERS):\n" + "\n".join(found)


def test_every_allowed_upward_import_still_exists():
    """An allow-list entry whose import is gone must be deleted, so the list only shrinks."""
    present = {(importer, imported) for _, importer, imported in upward_imports(_package_files())}
    stale = sorted(set(ALLOWED_UPWARD) - present)
    assert stale == [], f"delete these stale entries of ALLOWED_UPWARD: {stale}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from lightning_kd.training.loss_terms import logits_of\n",
         ["lightning_kd.training.loss_terms"]),
        ("def f():\n    import lightning_kd.cli\n", ["lightning_kd.cli"]),
        ("from lightning_kd import training\n", ["lightning_kd.training"]),
        ("from lightning_kd import DistillationModule\n", ["lightning_kd"]),
        ("from ..training import teacher\n", ["lightning_kd.training.teacher"]),
        ("from .codec import EXACT_CODEC\n", []),
        ("from lightning_kd.losses import KDLoss\nimport torch\n", []),
    ],
)  # fmt: skip
def test_the_checker_finds_upward_imports(source, expected):
    """Module-level, function-level, ``from lightning_kd import`` and relative imports of a
    module in ``teacher_cache`` are each found (and downward ones are not)."""
    path = PACKAGE / "teacher_cache" / "probe_module.py"
    module = module_name(path)
    targets = [t for _, t in imported_modules(ast.parse(source), module, is_package=False)]
    assert [t for t in targets if LAYER_OF[part_of(t)] > LAYER_OF[part_of(module)]] == expected
