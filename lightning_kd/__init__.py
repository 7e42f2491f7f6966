"""lightning_kd: knowledge distillation of large language models for PyTorch Lightning.

Layout (one package per concern):

- :mod:`lightning_kd.losses`: ``KDLoss`` and its chunked, vocabulary-parallel engine (plain
  PyTorch, no Lightning import).
- :mod:`lightning_kd.training`: ``DistillationModule`` and the parts it composes (teacher
  backends in ``training.teachers``, the sequence source, token window, checkpoint policy,
  evaluation metrics), ``CausalLMModule``, optimizers.
- :mod:`lightning_kd.parallel`: device-mesh groups, the ordered parallelize pipeline
  (``parallelize_model``: TP, activation checkpointing/compile, FSDP2, sharded loading),
  gradient clipping.
- :mod:`lightning_kd.checkpoint`: crash-safe checkpoints (layout, verification, resolution of
  ``last``, the folder lock, the strategy); :mod:`lightning_kd.io`: atomic writes and hashes.
- :mod:`lightning_kd.models`: the model contract, ``TinyLlama``, Hugging Face models.
- :mod:`lightning_kd.data`, :mod:`lightning_kd.teacher_cache`, :mod:`lightning_kd.export`,
  :mod:`lightning_kd.callbacks`, :mod:`lightning_kd.generation`, :mod:`lightning_kd.cli`.
- :mod:`lightning_kd.compat`: every compatibility shim (old module paths and names) and the
  release that removes them.

``KDLoss`` needs only PyTorch; the Lightning-based classes are imported on first use, so
``from lightning_kd import KDLoss`` works in a plain PyTorch loop without importing Lightning.
Every top-level name is imported on first use: ``import lightning_kd`` itself imports neither
torch nor Lightning, so the ``lightning-kd --help`` entry point answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_kd import compat
from lightning_kd.compat import MOVED_MODULES as MOVED_MODULES  # 0.2 home of the table

if TYPE_CHECKING:
    from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
    from lightning_kd.losses.linear_kd_loss import LinearKDLoss
    from lightning_kd.losses.topk_kd_loss import TopKKDLoss
    from lightning_kd.models.tiny_llama import TinyLlama
    from lightning_kd.training.distillation import DistillationModule
    from lightning_kd.training.lm_module import CausalLMModule
    from lightning_kd.training.loss_terms import LossTerms

_LAZY = {
    "CausalLMModule": "lightning_kd.training.lm_module",
    "DistillationModule": "lightning_kd.training.distillation",
    "KDLoss": "lightning_kd.losses.kd_loss",
    "KDLossOutput": "lightning_kd.losses.kd_loss",
    "LinearKDLoss": "lightning_kd.losses.linear_kd_loss",
    "LossTerms": "lightning_kd.training.loss_terms",
    "TinyLlama": "lightning_kd.models.tiny_llama",
    "TopKKDLoss": "lightning_kd.losses.topk_kd_loss",
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
__version__ = "0.3.0.dev0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_kd' has no attribute {name!r}")


compat.install()
