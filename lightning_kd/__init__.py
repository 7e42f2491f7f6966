"""lightning_kd: knowledge distillation of large language models for PyTorch Lightning.

Layout (one package per concern):

- :mod:`lightning_kd.losses`: ``KDLoss`` and its chunked, vocabulary-parallel engine (plain
  PyTorch, no Lightning import).
- :mod:`lightning_kd.training`: ``DistillationModule`` and the parts it composes (teacher source,
  token window, checkpoint policy, evaluation metrics), ``CausalLMModule``, optimizers.
- :mod:`lightning_kd.parallel`: device-mesh groups, TP plan application and checks, FSDP2,
  gradient clipping.
- :mod:`lightning_kd.models`: the model contract, ``TinyLlama``, Hugging Face models.
- :mod:`lightning_kd.data`, :mod:`lightning_kd.callbacks`, :mod:`lightning_kd.cli`.

``KDLoss`` needs only PyTorch; the Lightning-based classes are imported on first use, so
``from lightning_kd import KDLoss`` works in a plain PyTorch loop without importing Lightning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.models.tiny_llama import TinyLlama

if TYPE_CHECKING:
    from lightning_kd.training.causal_lm import CausalLMModule
    from lightning_kd.training.distillation import DistillationModule
    from lightning_kd.training.loss_terms import LossTerms

_LAZY = {
    "CausalLMModule": "lightning_kd.training.causal_lm",
    "DistillationModule": "lightning_kd.training.distillation",
    "LinearKDLoss": "lightning_kd.losses.linear_kd_loss",
    "LossTerms": "lightning_kd.training.loss_terms",
    "TopKKDLoss": "lightning_kd.losses.topk_kd_loss",
}

#: Module paths of version 0.1 and where they live now; importing an old path still works
#: (with a DeprecationWarning) for one release.
MOVED_MODULES = {
    "lightning_kd.callbacks.kl_plot": "lightning_kd.callbacks.divergence_plot",
    "lightning_kd.callbacks.per_token_kl": "lightning_kd.callbacks.per_token_divergence",
    "lightning_kd.chunked": "lightning_kd.losses.engine",
    "lightning_kd.cross_entropy": "lightning_kd.losses.cross_entropy",
    "lightning_kd.divergence": "lightning_kd.losses.divergences",
    "lightning_kd.grad_clip": "lightning_kd.parallel.grad_clip",
    "lightning_kd.hf": "lightning_kd.models.hf",
    "lightning_kd.kd_loss": "lightning_kd.losses.kd_loss",
    "lightning_kd.lm_module": "lightning_kd.training.causal_lm",
    "lightning_kd.module": "lightning_kd.training.distillation",
    "lightning_kd.optim": "lightning_kd.training.optim",
    "lightning_kd.parallelize": "lightning_kd.parallel.plans",
    "lightning_kd.tensor_parallel": "lightning_kd.losses.vocab_parallel",
    "lightning_kd.tiny_llama": "lightning_kd.models.tiny_llama",
    "lightning_kd.vocab_softmax": "lightning_kd.losses.vocab_softmax",
}

__all__ = [
    "CausalLMModule",
    "DistillationModule",
    "KDLoss",
    "KDLossOutput",
    "LinearKDLoss",
    "LossTerms",
    "TinyLlama",
    "TopKKDLoss",
]
__version__ = "0.2.0.dev0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_kd' has no attribute {name!r}")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the 0.1 module paths of :data:`MOVED_MODULES` to their new modules."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # importlib overwrites it with the old path's spec
        return module

    def exec_module(self, module: Any) -> None:
        # The new module is already executed; give it its own spec back (reload, pickling).
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
