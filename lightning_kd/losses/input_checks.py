"""Call-time checks of ``KDLoss`` and ``LinearKDLoss`` (one set of rules and messages)."""

from __future__ import annotations

import math
from numbers import Real

from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate


def check_normaliser(num_batch_labels: int | float | Tensor) -> float:
    """``num_batch_labels`` as a positive finite float (a number or a one-element tensor).

    Raises:
        ValueError: otherwise.
    """
    value = num_batch_labels
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                "num_batch_labels must be a number or a one-element tensor, got a tensor of "
                f"shape {tuple(value.shape)}."
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"num_batch_labels must be a positive number, got {num_batch_labels!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            "num_batch_labels must be > 0 (the count of valid tokens in the whole "
            f"gradient-accumulation window), got {value!r}."
        )
    return float(value)


def check_label_range(targets: Tensor, valid: Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` if a valid token's label is not a vocabulary id in ``[0, V)``."""
    flat_valid = valid.reshape(-1).to(targets.device)
    bad = flat_valid & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"labels of valid tokens must be vocabulary ids in [0, {vocab_size}) for the "
            f"cross-entropy term (kd_ratio < 1), got {first}; mark ignored tokens with "
            "ignore_index."
        )


def local_labels(labels: Tensor) -> Tensor:
    """A plain tensor of the labels: the local tensor of a replicated DTensor, the full tensor
    of any other DTensor, plain tensors unchanged."""
    if not isinstance(labels, DTensor):
        return labels
    if all(isinstance(p, Replicate) for p in labels.placements):
        return labels.to_local()
    return labels.full_tensor()
