"""Parallelism for distillation: device-mesh groups, tensor-parallel plans and their checks,
FSDP2 with a precision policy and gradient clipping across meshes. No Lightning.

Checkpoints moved to :mod:`lightning_kd.checkpoint` in 0.3; their 0.2 names still import from
here, with a DeprecationWarning (:data:`lightning_kd.compat.MOVED_NAMES`).
"""

from __future__ import annotations

from typing import Any

from lightning_kd.compat import renamed_attribute
from lightning_kd.parallel.fsdp import apply_fsdp, mixed_precision_policy
from lightning_kd.parallel.grad_clip import clip_grad_norm, total_grad_norm
from lightning_kd.parallel.mesh import DataParallel, data_parallel, data_parallel_group, dp_sum
from lightning_kd.parallel.pipeline import parallelize_model
from lightning_kd.parallel.plans import (
    apply_tensor_parallel,
    check_vocab_parallel_logits,
    resolve_tensor_parallel_plan,
)


def __getattr__(name: str) -> Any:
    # 0.2 names of the checkpoint package (lightning_kd.compat.MOVED_NAMES), e.g.
    # `class_path: lightning_kd.parallel.AtomicModelParallelStrategy`, imported on first use.
    return renamed_attribute(__name__, name)


__all__ = [
    "DataParallel",
    "apply_fsdp",
    "apply_tensor_parallel",
    "check_vocab_parallel_logits",
    "clip_grad_norm",
    "data_parallel",
    "data_parallel_group",
    "dp_sum",
    "mixed_precision_policy",
    "parallelize_model",
    "resolve_tensor_parallel_plan",
    "total_grad_norm",
]
