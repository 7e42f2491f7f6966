"""Parallelism for distillation: device-mesh groups, tensor-parallel plans and their checks,
FSDP2 with a precision policy and gradient clipping across meshes. No Lightning.

Checkpoints moved to :mod:`lightning_kd.checkpoint` in 0.3; their names stay importable from
here for 0.2 code (``AtomicModelParallelStrategy`` on first use, as it needs Lightning).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# 0.2 compatibility: checkpoint names that moved to lightning_kd.checkpoint.
from lightning_kd.checkpoint import (
    CheckpointInfo,
    TornCheckpointWarning,
    UnverifiedCheckpointWarning,
    inspect_checkpoint,
    resolve_last_checkpoint,
    verify_checkpoint,
)
from lightning_kd.parallel.fsdp import apply_fsdp, mixed_precision_policy
from lightning_kd.parallel.grad_clip import clip_grad_norm, total_grad_norm
from lightning_kd.parallel.mesh import DataParallel, data_parallel, data_parallel_group, dp_sum
from lightning_kd.parallel.pipeline import parallelize_model
from lightning_kd.parallel.plans import (
    apply_tensor_parallel,
    check_vocab_parallel_logits,
    resolve_tensor_parallel_plan,
)

if TYPE_CHECKING:
    from lightning_kd.checkpoint.strategy import AtomicModelParallelStrategy


def __getattr__(name: str) -> Any:
    # 0.2 compatibility (`class_path: lightning_kd.parallel.AtomicModelParallelStrategy`),
    # imported on first use so that this package does not import Lightning.
    if name == "AtomicModelParallelStrategy":
        return importlib.import_module(
            "lightning_kd.checkpoint.strategy"
        ).AtomicModelParallelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AtomicModelParallelStrategy",
    "CheckpointInfo",
    "DataParallel",
    "TornCheckpointWarning",
    "UnverifiedCheckpointWarning",
    "apply_fsdp",
    "apply_tensor_parallel",
    "check_vocab_parallel_logits",
    "clip_grad_norm",
    "data_parallel",
    "data_parallel_group",
    "dp_sum",
    "inspect_checkpoint",
    "mixed_precision_policy",
    "parallelize_model",
    "resolve_last_checkpoint",
    "resolve_tensor_parallel_plan",
    "total_grad_norm",
    "verify_checkpoint",
]
