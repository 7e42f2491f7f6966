"""lightning_kd: knowledge distillation of large language models for PyTorch Lightning.

``KDLoss`` needs only PyTorch; the Lightning-based classes are imported on first use, so
``from lightning_kd import KDLoss`` works in a plain PyTorch loop without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_kd.kd_loss import KDLoss, KDLossOutput
from lightning_kd.tiny_llama import TinyLlama

if TYPE_CHECKING:
    from lightning_kd.lm_module import CausalLMModule
    from lightning_kd.module import DistillationModule, LossTerms

_LAZY = {
    "CausalLMModule": "lightning_kd.lm_module",
    "DistillationModule": "lightning_kd.module",
    "LossTerms": "lightning_kd.module",
}

__all__ = [
    "CausalLMModule",
    "DistillationModule",
    "KDLoss",
    "KDLossOutput",
    "LossTerms",
    "TinyLlama",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_kd' has no attribute {name!r}")
