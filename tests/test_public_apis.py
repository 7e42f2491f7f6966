"""lightning_kd reads no private attribute of torch, Lightning or transformers outside the one
adapter (``lightning_kd/lightning_private.py``), and no module imports another
module's private names.

``self._x`` counts as ours only when some lightning_kd source defines ``_x`` (assigns it or
defines a method or class attribute of that name); inherited private attributes such as
LightningModule's ``self._trainer`` or nn.Module's ``self._register_state_dict_hook`` are
flagged like any other private access.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_kd"
ADAPTER = PACKAGE / "lightning_private.py"
# Public API despite the underscore (namedtuple methods).
PUBLIC = {"_asdict", "_replace", "_fields", "_make"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _defined_names(trees: list[ast.AST]) -> set[str]:
    """Private names lightning_kd itself defines: ``self._x = ...``, ``def _x``, ``_x = ...``."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if _is_private(n)}


def private_uses(tree: ast.AST, own: set[str], where: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = _root_name(node.value)
            if root not in ("self", "cls") or node.attr not in own:
                found.append(f"{where}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_kd"):
            found += [f"{where}:{node.lineno} import {a.name}" for a in node.names
                      if _is_private(a.name)]  # fmt: skip
    return found


def test_no_private_attribute_or_import_outside_the_adapter():
    files = sorted(PACKAGE.rglob("*.py"))
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for p in files}
    own = _defined_names(list(trees.values()))
    uses = [
        use
        for path, tree in trees.items()
        if path != ADAPTER
        for use in private_uses(tree, own, str(path.relative_to(PACKAGE)))
    ]
    assert uses == [], "private APIs used outside lightning_private.py:\n" + "\n".join(uses)


def test_the_checker_finds_private_uses():
    source = (
        "from lightning_kd.x import _hidden\n"
        "class M:\n"
        "    def f(self, trainer):\n"
        "        self._mine = 1\n"
        "        return trainer.fit_loop._x, self._trainer, self._mine, self.__dict__\n"
    )
    tree = ast.parse(source)
    uses = private_uses(tree, _defined_names([tree]), "probe.py")
    assert uses == ["probe.py:1 import _hidden", "probe.py:5 ._x", "probe.py:5 ._trainer"]


# ---------------------------------------------------------------------------- compatibility shims
def test_every_moved_module_imports_with_a_warning_naming_the_removal_release():
    import importlib
    import sys
    import warnings

    from lightning_kd import compat

    for old, new in compat.MOVED_MODULES.items():
        assert not (PACKAGE.parent / f"{old.replace('.', '/')}.py").exists(), old
        was_loaded = old in sys.modules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        try:
            assert module is importlib.import_module(new), old
            if not was_loaded:
                assert any(
                    w.category is DeprecationWarning and compat.REMOVED_IN in str(w.message)
                    for w in caught
                ), (old, [str(w.message) for w in caught])
        finally:
            if not was_loaded:
                del sys.modules[old]


def test_every_renamed_name_resolves_with_a_warning():
    import importlib

    import pytest

    from lightning_kd import compat

    for module_name, names in compat.RENAMED.items():
        module = importlib.import_module(module_name)
        for old, new in names.items():
            assert old not in getattr(module, "__all__", ()), (module_name, old)
            with pytest.warns(DeprecationWarning, match=compat.REMOVED_IN):
                assert getattr(module, old) is getattr(module, new)
        with pytest.raises(AttributeError):
            module.no_such_name  # noqa: B018


def test_compat_is_the_only_place_that_warns_of_a_moved_module():
    """No module outside compat.py defines its own module-path shim."""
    found = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "compat.py" and "MetaPathFinder" in path.read_text()
    ]
    assert found == []


# ---------------------------------------------------------------------------- README "Public API"
#: The stable names, as the README's "Public API" section lists them.
PUBLIC_API = {
    "lightning_kd": ["KDLoss", "KDLossOutput", "LinearKDLoss", "TopKKDLoss",
                     "DistillationModule", "CausalLMModule", "LossTerms", "TinyLlama"],
    "lightning_kd.losses": ["Divergence", "ForwardKL", "ReverseKL", "JSD", "TVD", "SkewKL",
                            "SkewReverseKL", "resolve_divergence", "KDOptions", "ULDLoss",
                            "HybridKDLoss", "TokenSpans", "VocabMap", "CrossTokenizerOutput"],
    "lightning_kd.data": ["TextDataModule", "ChatDataModule", "SplitDataModule",
                          "CrossTokenizerDataModule",
                          "ByteTokenizer", "ChatEncoder", "read_chat_records", "read_documents",
                          "generate_corpus", "generate_instructions", "ResumableDataLoader",
                          "ResumableSampler"],
    "lightning_kd.callbacks": ["PerTokenDivergenceMonitor", "TopToken", "DivergencePlot",
                               "DivergenceSample", "CheckpointOnStop", "Stopped",
                               "ExportOnFitEnd"],
    "lightning_kd.models": ["CausalLM", "TinyLlama"],
    "lightning_kd.models.hf": ["HFCausalLM"],
    "lightning_kd.teacher_cache": ["TeacherCache", "CachedTeacher", "CacheMetadata",
                                   "write_teacher_cache"],
    "lightning_kd.export": ["export_student", "export_checkpoint", "export_lora_adapters"],
    "lightning_kd.models.lora": ["LoraOptions"],
    "lightning_kd.training.hidden_state_loss": ["HiddenStateLoss"],
    "lightning_kd.training.teachers": ["TeacherBackend", "LiveTeacher", "FusedHeadTeacher",
                                       "CacheTeacher", "select_teacher"],
    "lightning_kd.training.sequences": ["SequenceSource", "DataLoaderSequences"],
    "lightning_kd.parallel": ["parallelize_model"],
    "lightning_kd.checkpoint.strategy": ["AtomicModelParallelStrategy"],
    "lightning_kd.checkpoint": ["resolve_last_checkpoint", "verify_checkpoint",
                                "inspect_checkpoint", "FolderLock"],
    "lightning_kd.training.on_policy": ["OnPolicySequences"],
    "lightning_kd.rollout": ["generate", "SamplingOptions", "Rollout"],
    "lightning_kd.cli": ["KDLightningCLI", "main"],
}  # fmt: skip


def test_the_readme_public_api_is_listed_and_imports():
    import importlib

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Public API", 1)[1].split("\n## ", 1)[0]
    for module_name, names in PUBLIC_API.items():
        assert f"`{module_name}" in section, module_name
        module = importlib.import_module(module_name)
        for name in names:
            assert f"`{name}`" in section or f".{name}`" in section, (module_name, name)
            assert hasattr(module, name), (module_name, name)
