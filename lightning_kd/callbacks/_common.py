"""Helpers shared by the KL callbacks: the data-parallel group, and reading the
per-token KL that :class:`~lightning_kd.DistillationModule` returns from ``training_step``
(:class:`PerTokenKLCallback`, the base of both callbacks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_kd.parallel.mesh import DataParallel
from lightning_kd.parallel.mesh import data_parallel as mesh_data_parallel


def data_parallel(pl_module: LightningModule) -> DataParallel:
    """The data-parallel group of ``pl_module`` (see :mod:`lightning_kd.parallel.mesh`):
    tensor-parallel ranks hold identical values and must not be counted twice."""
    return mesh_data_parallel(pl_module.device_mesh)


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


class PerTokenKLCallback(Callback):
    """A callback fed with the per-token KL of every training micro-batch.

    ``on_train_batch_end`` asks :meth:`_wants_batch` whether this batch is of interest, reads
    ``(per_token_kl, valid_mask)`` from the ``training_step`` output (detached, plain tensors,
    see :func:`per_token_outputs`) and hands them to :meth:`_record`. An output without them is
    skipped, with one warning (rank 0) per callback instance.
    """

    def __init__(self) -> None:
        super().__init__()
        self._warned_outputs = False

    def _wants_batch(self, trainer: Trainer) -> bool:
        """Whether to read this batch's per-token KL (default: every batch)."""
        return True

    def _record(
        self, trainer: Trainer, pl_module: LightningModule, kl: Tensor, valid: Tensor, batch: Any
    ) -> None:
        """Use the per-token KL ``kl`` and ``valid`` mask (both ``[B, S]``) of ``batch``."""
        raise NotImplementedError

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._wants_batch(trainer):
            return
        found = per_token_outputs(outputs)
        if found is None:
            if not self._warned_outputs:
                rank_zero_warn(MISSING_OUTPUTS.format(name=type(self).__name__))
                self._warned_outputs = True
            return
        self._record(trainer, pl_module, *found, batch)
