"""What a distillation objective returns, and how logits are read from a model's output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor


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
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    per_token_div: Tensor
    valid_mask: Tensor

    @property
    def per_token_kl(self) -> Tensor:
        """0.1 name of :attr:`per_token_div` (read-only alias)."""
        return self.per_token_div


def find_logits(output: Any) -> Tensor | None:
    """Logits from a model output (a tensor, or a mapping/object with ``logits``), else None."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
    else:
        logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def logits_of(output: Any) -> Tensor:
    """Logits from a model output: a tensor, or an object/dict with ``logits`` (HF style).

    Raises:
        ValueError: when the output carries no logits tensor.
    """
    logits = find_logits(output)
    if logits is None:
        raise ValueError(
            f"model output must be a logits tensor or have a `logits` field, got {type(output)}."
        )
    return logits
