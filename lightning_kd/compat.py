"""Every compatibility shim of lightning_kd in one place, with the release that removes it.

Old module paths (:data:`MOVED_MODULES`) and old public names (:data:`RENAMED`) keep working
with a :class:`DeprecationWarning` until version :data:`REMOVED_IN`. Register a new shim here,
never in the module that moved: :func:`install` resolves the module paths on import of
``lightning_kd``, and a package that renamed a name forwards its module ``__getattr__`` to
:func:`renamed_attribute`.

Kept elsewhere because they are data formats, not import paths (removed in the same release):

- ``per_token_kl``: the 0.1 name of ``per_token_div`` on :class:`~lightning_kd.KDLossOutput`
  and :class:`~lightning_kd.LossTerms` (read-only properties), and the ``training_step`` output
  key the callbacks still read (``lightning_kd.callbacks._common.LEGACY_PER_TOKEN_KEY``);
- 0.1 callback states saved under their old class names (``legacy_state_key``) and their
  ``kl/...`` history keys, read on resume;
- ``kd_ratio`` set on ``DistillationModule`` instead of on the loss (0.1 configs);
- ``lightning_kd.parallel.atomic_checkpoint``: its 0.2 names come from three modules of
  :mod:`lightning_kd.checkpoint` (layout, inspection, the strategy), so it stays a re-export
  module that warns on import;
- ``DistillationModule.kd_loss``, the 0.2 name of the loss object (now ``loss``): a
  property, since a subclass or a callback reads it as an attribute.

This module imports nothing from lightning_kd, so every package may use it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__all__ = ["MOVED_MODULES", "MOVED_NAMES", "REMOVED_IN", "RENAMED", "install", "renamed_attribute"]

#: The release that removes every shim listed here.
REMOVED_IN = "0.4.0"

#: Old module path → where the module lives now. Importing an old path returns the new module
#: (the same object) with a DeprecationWarning.
MOVED_MODULES: dict[str, str] = {
    # 0.1 → 0.2: one package per concern.
    "lightning_kd.callbacks.kl_plot": "lightning_kd.callbacks.divergence_plot",
    "lightning_kd.callbacks.per_token_kl": "lightning_kd.callbacks.per_token_divergence",
    "lightning_kd.chunked": "lightning_kd.losses.engine",
    "lightning_kd.cross_entropy": "lightning_kd.losses.cross_entropy",
    "lightning_kd.divergence": "lightning_kd.losses.divergences",
    "lightning_kd.grad_clip": "lightning_kd.parallel.grad_clip",
    "lightning_kd.hf": "lightning_kd.models.hf",
    "lightning_kd.kd_loss": "lightning_kd.losses.kd_loss",
    "lightning_kd.lm_module": "lightning_kd.training.lm_module",
    "lightning_kd.module": "lightning_kd.training.distillation",
    "lightning_kd.optim": "lightning_kd.training.optim",
    "lightning_kd.parallelize": "lightning_kd.parallel.plans",
    "lightning_kd.tensor_parallel": "lightning_kd.losses.vocab_parallel",
    "lightning_kd.tiny_llama": "lightning_kd.models.tiny_llama",
    "lightning_kd.vocab_softmax": "lightning_kd.losses.vocab_softmax",
    # 0.2 → 0.3: one name per thing, imports that point down.
    "lightning_kd.data.datamodule": "lightning_kd.data.text_datamodule",
    "lightning_kd.training.causal_lm": "lightning_kd.training.lm_module",
    "lightning_kd.training.lightning_private": "lightning_kd.lightning_private",
    "lightning_kd.parallel.distributed_state": "lightning_kd.checkpoint.distributed_state",
}

_CHECKPOINT_NAMES = (
    "CheckpointInfo",
    "TornCheckpointWarning",
    "UnverifiedCheckpointWarning",
    "inspect_checkpoint",
    "resolve_last_checkpoint",
    "verify_checkpoint",
)

#: Module → {name: the module it moved to} of public names that moved to another package (0.2 →
#: 0.3: checkpoints left ``lightning_kd.parallel``); the old module's ``__getattr__`` calls
#: :func:`renamed_attribute`, which imports the new module on first use.
MOVED_NAMES: dict[str, dict[str, str]] = {
    "lightning_kd.parallel": {
        **{name: "lightning_kd.checkpoint" for name in _CHECKPOINT_NAMES},
        "AtomicModelParallelStrategy": "lightning_kd.checkpoint.strategy",
    },
}

#: Module → {old name: new name} of renamed public names; the module's ``__getattr__`` calls
#: :func:`renamed_attribute`. Old names are not in the modules' ``__all__``.
RENAMED: dict[str, dict[str, str]] = {
    "lightning_kd.callbacks": {
        "KLPlot": "DivergencePlot",
        "KLSample": "DivergenceSample",
        "PerTokenKLMonitor": "PerTokenDivergenceMonitor",
        "TopKLToken": "TopToken",
    },
    "lightning_kd.callbacks.divergence_plot": {
        "KLPlot": "DivergencePlot",
        "KLSample": "DivergenceSample",
    },
    "lightning_kd.callbacks.per_token_divergence": {
        "PerTokenKLMonitor": "PerTokenDivergenceMonitor",
        "TopKLToken": "TopToken",
    },
}


def renamed_attribute(module: str, name: str) -> Any:
    """The object an old name of ``module`` stands for (:data:`RENAMED`, :data:`MOVED_NAMES`),
    with a DeprecationWarning.

    Args:
        module: the ``__name__`` of the module whose ``__getattr__`` was called.
        name: the attribute asked for.

    Raises:
        AttributeError: when ``name`` is no old name of ``module`` (as ``getattr`` expects).
    """
    new = RENAMED.get(module, {}).get(name)
    moved_to = MOVED_NAMES.get(module, {}).get(name)
    if new is None and moved_to is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    where = f"{moved_to}.{name}" if moved_to else f"{module}.{new}"
    warnings.warn(
        f"{module}.{name} is now {where}; the old name will be removed in {REMOVED_IN}.",
        DeprecationWarning,
        stacklevel=3,
    )
    if moved_to is not None:
        return getattr(importlib.import_module(moved_to), name)
    return getattr(sys.modules[module], new)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the old module paths of :data:`MOVED_MODULES` to their new modules."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in {REMOVED_IN}.",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # importlib overwrites it with the old path's spec
        return module

    def exec_module(self, module: Any) -> None:
        # The new module is already executed; give it its own spec back (reload, pickling).
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Make the old module paths importable (idempotent; ``import lightning_kd`` calls it)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
