"""What a distillation objective returns, and how logits are read from a model's output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor


class LossTerms(NamedTuple):
    """What :meth:`DistillationModule.compute_loss` returns; every term is a per-token mean
    over the micro-batch's valid tokens (0-dim tensors).

    Attributes:
        loss: the total to optimise, ``(1 − kd_ratio)·ce + kd_ratio·kd`` plus any extra terms.
        kd_loss: the distillation divergence per token (T²-scaled).
        ce_loss: cross-entropy of the student on the labels per token (0 when ``kd_ratio`` is 1).
        per_token_kl: [*] detached per-token divergence for logging callbacks (0 where ignored).
        valid_mask: [*] bool, True where the label is not ignored.
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    per_token_kl: Tensor
    valid_mask: Tensor


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
