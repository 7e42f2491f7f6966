"""Optimizers built from callables after parallelisation, shared by the LightningModules.

Both modules take the optimizer and scheduler as callables and build them in
``configure_optimizers`` (after ``configure_model`` has applied TP/FSDP2), because an optimizer
built earlier would hold the pre-parallelisation parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def default_optimizer(params: Iterable[Tensor]) -> Optimizer:
    """AdamW with lr 1e-3: the default of the modules' ``optimizer`` argument."""
    return torch.optim.AdamW(params, lr=1e-3)


def build_optimizers(
    params: Iterable[Tensor],
    optimizer: Callable[[Iterable[Tensor]], Optimizer],
    lr_scheduler: Callable[[Optimizer], Any] | None,
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer, plus the scheduler stepped every
    optimizer step when one is given."""
    built = optimizer(params)
    if lr_scheduler is None:
        return built
    scheduler = lr_scheduler(built)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
