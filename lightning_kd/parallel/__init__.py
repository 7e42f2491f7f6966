"""Parallelism for distillation: device-mesh groups, tensor-parallel plans and their checks,
FSDP2 with a precision policy, gradient clipping across meshes, and crash-safe distributed
checkpoints (``AtomicModelParallelStrategy``, ``resolve_last_checkpoint``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    from lightning_kd.parallel.atomic_checkpoint import (
        AtomicModelParallelStrategy,
        CheckpointInfo,
        TornCheckpointWarning,
        UnverifiedCheckpointWarning,
        inspect_checkpoint,
        resolve_last_checkpoint,
        verify_checkpoint,
    )

# Imported on first use: they need Lightning, the rest of this package does not.
_LAZY = {
    name: "lightning_kd.parallel.atomic_checkpoint"
    for name in (
        "AtomicModelParallelStrategy",
        "CheckpointInfo",
        "TornCheckpointWarning",
        "UnverifiedCheckpointWarning",
        "inspect_checkpoint",
        "resolve_last_checkpoint",
        "verify_checkpoint",
    )
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
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
