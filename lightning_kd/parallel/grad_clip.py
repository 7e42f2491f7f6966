"""Gradient-norm clipping over a mix of plain and DTensor gradients on different meshes.

``torch.nn.utils.clip_grad_norm_`` (and so ``Trainer(gradient_clip_val=...)``) fails when
parameters are a mix of plain tensors and DTensors, or DTensors on different meshes (TP-only
vs FSDP2+TP parameters). Here the squared norm is computed per mesh group (a DTensor norm
reduces over its own mesh, counting replicated shards once), the groups are combined, and every
gradient is scaled by the same coefficient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def _mesh_key(grad: Tensor) -> object:
    return (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None


def total_grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    """The global L2 norm of all gradients, as a plain fp32 scalar equal on every rank."""
    groups: dict[object, list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p.grad)
    total = torch.zeros((), dtype=torch.float32)
    for grads in groups.values():
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        )
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total = total + norm.cpu().float().square()
    return total.sqrt()


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale gradients in place so that their global L2 norm is at most ``max_norm``.

    Args:
        parameters: parameters whose ``.grad`` may be plain tensors or DTensors on any meshes.
        max_norm: the largest allowed global norm (> 0).

    Returns:
        The global norm before clipping (plain fp32 scalar).

    Raises:
        ValueError: for a non-positive or non-finite ``max_norm``.
    """
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm!r}.")
    params = [p for p in parameters if p.grad is not None]
    norm = total_grad_norm(params)
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return norm
