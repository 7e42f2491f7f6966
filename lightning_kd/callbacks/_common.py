"""Helpers shared by the KL callbacks: argument checks, the data-parallel group, and reading the
per-token KL that :class:`~lightning_kd.DistillationModule` returns from ``training_step``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.distributed.tensor import DTensor


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else ValueError (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


class DataParallel(NamedTuple):
    """Where to reduce metrics: ``sync`` is False when there is nothing to reduce over."""

    sync: bool
    group: dist.ProcessGroup | None
    rank: int
    size: int


def data_parallel(pl_module: LightningModule) -> DataParallel:
    """The data-parallel group of ``pl_module``: its ``dp_group`` property when it has one
    (tensor-parallel ranks hold identical values and must not be counted twice), else the
    default world group in a distributed run, else none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DataParallel(False, None, 0, 1)
    if hasattr(type(pl_module), "dp_group"):
        group = pl_module.dp_group
        if group is None:
            return DataParallel(False, None, 0, 1)
    else:
        group = dist.group.WORLD
    size = dist.get_world_size(group)
    return DataParallel(size > 1, group, dist.get_rank(group), size)


def local(tensor: Tensor) -> Tensor:
    """A plain tensor for torchmetrics and collectives (never a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def per_token_outputs(outputs: Any) -> tuple[Tensor, Tensor] | None:
    """``(per_token_kl, valid_mask)`` from a ``training_step`` output, detached and plain, or
    None when the output does not carry them."""
    if not isinstance(outputs, Mapping):
        return None
    kl, valid = outputs.get("per_token_kl"), outputs.get("valid_mask")
    if not isinstance(kl, Tensor) or not isinstance(valid, Tensor):
        return None
    kl, valid = local(kl).detach(), local(valid).detach()
    if kl.shape != valid.shape or kl.ndim < 1:
        raise ValueError(
            "per_token_kl and valid_mask must have the same shape [B, S], got "
            f"{tuple(kl.shape)} and {tuple(valid.shape)}."
        )
    return kl.float(), valid.to(device=kl.device, dtype=bool)


MISSING_OUTPUTS = (
    "training_step must return a dict with `per_token_kl` and `valid_mask` (as "
    "DistillationModule does); {name} found none and records nothing."
)
