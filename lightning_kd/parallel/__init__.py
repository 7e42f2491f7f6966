"""Parallelism for distillation: device-mesh groups, tensor-parallel plans and their checks,
FSDP2 with a precision policy, and gradient clipping across meshes."""

from lightning_kd.parallel.fsdp import apply_fsdp, mixed_precision_policy
from lightning_kd.parallel.grad_clip import clip_grad_norm, total_grad_norm
from lightning_kd.parallel.mesh import DataParallel, data_parallel, data_parallel_group, dp_sum
from lightning_kd.parallel.plans import (
    apply_tensor_parallel,
    check_vocab_parallel_logits,
    resolve_tensor_parallel_plan,
)

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
    "resolve_tensor_parallel_plan",
    "total_grad_norm",
]
