"""Helpers shared by the per-token divergence callbacks: the data-parallel group, the label of
the loss's divergence, and reading the per-token divergence that
:class:`~lightning_kd.DistillationModule` returns from ``training_step``
(:class:`PerTokenDivergenceCallback`, the base of both callbacks)."""

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

#: The ``training_step`` output key of the per-token divergence, and the key version 0.1 used
#: (read when only it is present, for custom training steps written for 0.1).
PER_TOKEN_KEY, LEGACY_PER_TOKEN_KEY = "per_token_div", "per_token_kl"


def data_parallel(pl_module: LightningModule) -> DataParallel:
    """The data-parallel group of ``pl_module`` (see :mod:`lightning_kd.parallel.mesh`):
    tensor-parallel ranks hold identical values and must not be counted twice."""
    return mesh_data_parallel(pl_module.device_mesh)


def divergence_label(pl_module: Any) -> str:
    """A short human-readable name of the divergence ``pl_module`` distils with, for log lines,
    tables and plots: ``pl_module.loss.divergence.label`` (e.g. ``"JSD(β=0.5)"``) when the
    module has such a loss, else ``"divergence"``."""
    divergence = getattr(getattr(pl_module, "loss", None), "divergence", None)
    label = getattr(divergence, "label", None)
    return label if isinstance(label, str) and label else "divergence"


def local(tensor: Tensor) -> Tensor:
    """A plain tensor for torchmetrics and collectives (never a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def per_token_outputs(outputs: Any) -> tuple[Tensor, Tensor] | None:
    """``(per_token_div, valid_mask)`` from a ``training_step`` output, detached and plain, or
    None when the output does not carry them. An output with 0.1's ``per_token_kl`` instead of
    ``per_token_div`` is read too."""
    if not isinstance(outputs, Mapping):
        return None
    key = PER_TOKEN_KEY if isinstance(outputs.get(PER_TOKEN_KEY), Tensor) else LEGACY_PER_TOKEN_KEY
    div, valid = outputs.get(key), outputs.get("valid_mask")
    if not isinstance(div, Tensor) or not isinstance(valid, Tensor):
        return None
    div, valid = local(div).detach(), local(valid).detach()
    if div.shape != valid.shape or div.ndim < 1:
        raise ValueError(
            f"{key} and valid_mask must have the same shape [B, S], got "
            f"{tuple(div.shape)} and {tuple(valid.shape)}."
        )
    return div.float(), valid.to(device=div.device, dtype=bool)


MISSING_OUTPUTS = (
    f"training_step must return a dict with `{PER_TOKEN_KEY}` and `valid_mask` (as "
    f"DistillationModule does; 0.1's `{LEGACY_PER_TOKEN_KEY}` is read too); {{name}} found none "
    "and records nothing."
)


class PerTokenDivergenceCallback(Callback):
    """A callback fed with the per-token divergence (the loss's chosen divergence,
    ``T²``-scaled) of every training micro-batch.

    ``on_train_batch_end`` asks :meth:`_wants_batch` whether this batch is of interest, reads
    ``(per_token_div, valid_mask)`` from the ``training_step`` output (detached, plain tensors,
    see :func:`per_token_outputs`) and hands them to :meth:`_record`. An output without them is
    skipped, with one warning (rank 0) per callback instance.

    Subclasses that were renamed after 0.1 set :attr:`legacy_state_key` to their 0.1 class
    name, so that the state a 0.1 checkpoint saved under that name is restored on resume.
    """

    #: The ``state_key`` this callback's state had in 0.1 checkpoints (None: unchanged).
    legacy_state_key: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self._warned_outputs = False

    def _wants_batch(self, trainer: Trainer) -> bool:
        """Whether to read this batch's per-token divergence (default: every batch)."""
        return True

    def _record(
        self, trainer: Trainer, pl_module: LightningModule, div: Tensor, valid: Tensor, batch: Any
    ) -> None:
        """Use the per-token divergence ``div`` and ``valid`` mask (both ``[B, S]``) of
        ``batch``."""
        raise NotImplementedError

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores callback states by ``state_key`` right after this hook: a 0.1
        # checkpoint holds this callback's state under its 0.1 class name.
        states = checkpoint.get("callbacks")
        legacy = self.legacy_state_key
        if (
            isinstance(states, dict)
            and legacy is not None
            and self.state_key not in states
            and legacy in states
        ):
            states[self.state_key] = states.pop(legacy)

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
