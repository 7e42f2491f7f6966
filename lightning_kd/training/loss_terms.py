"""What a distillation objective returns, and how logits are read from a model's output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

# Moved to the models package (the teacher cache reads outputs too); re-exported here.
from lightning_kd.models.outputs import find_logits, logits_of

__all__ = ["LossTerms", "find_logits", "logits_of"]


class LossTerms(NamedTuple):
    """What :meth:`DistillationModule.compute_loss` returns; every term is a per-token mean
    over the micro-batch's valid tokens (0-dim tensors).

    Attributes:
        loss: the total to optimise, ``kd_ratio·kd_loss + (1 − kd_ratio)·ce_loss`` plus any
            extra terms (connected to the student).
        kd_loss: the loss's divergence per token (T²-scaled; whichever divergence the loss
            uses), detached.
        ce_loss: the student's cross-entropy on the labels per token (temperature 1),
            detached; computed in the loss's pass whatever ``kd_ratio`` is.
        per_token_div: [*] detached per-token divergence for the logging callbacks (0 where
            ignored).
        valid_mask: [*] bool, True where the label is not ignored.
        extra: further terms already inside ``loss`` (per-token means, detached), logged as
            ``train/<name>`` (e.g. ``hidden_loss`` and ``hidden/s<i>_t<j>`` from a
            :class:`~lightning_kd.training.hidden_state_loss.HiddenStateLoss`); None when none.
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    per_token_div: Tensor
    valid_mask: Tensor
    extra: Mapping[str, Tensor] | None = None

    @property
    def per_token_kl(self) -> Tensor:
        """0.1 name of :attr:`per_token_div` (read-only alias)."""
        return self.per_token_div
