"""Warnings printed once per job (on global rank 0), without importing Lightning."""

from __future__ import annotations

import os
import warnings

import torch.distributed as dist

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank: the process group's, else the launchers' variables (as
    Lightning's ``rank_zero_only`` reads them), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def warn_rank_zero(message: str, category: type[Warning], stacklevel: int = 2) -> None:
    """``warnings.warn`` on global rank 0 only."""
    if global_rank() == 0:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
