"""Call-time checks of ``KDLoss`` and ``LinearKDLoss`` (one set of rules and messages)."""

from __future__ import annotations

import math
from numbers import Real

from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from lightning_kd.losses.vocab_softmax import VocabSoftmax


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


def check_labels_in_vocab(
    labels: Tensor, valid: Tensor, vocab: VocabSoftmax, logits: Tensor
) -> None:
    """Raise ``ValueError`` if a valid token's label is not a vocabulary id in ``[0, V)``,
    whatever terms the loss computes (a label of -1 or ``V`` is padding marked with the wrong
    ``ignore_index``, which would otherwise be distilled silently).

    Args:
        labels: [*] integer labels (the local tensor).
        valid: [*] bool, True where the label is not ``ignore_index``.
        vocab: the softmax of the logits' layout; gives the whole vocabulary size ``V`` (one
            all-reduce of the shard sizes when the vocabulary is sharded).
        logits: [*, V or V/tp] the (local) student logits.
    """
    _, vocab_size = vocab.vocab_range(logits.shape[-1], logits.device)
    flat_valid = valid.reshape(-1)
    targets = labels.reshape(-1)
    bad = flat_valid & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"labels must be ignore_index or vocabulary ids in [0, {vocab_size}), got {first} "
            f"({int(bad.sum())} such tokens); mark padding and ignored tokens with ignore_index."
        )


def local_labels(labels: Tensor) -> Tensor:
    """A plain tensor of the labels: the local tensor of a replicated DTensor, the full tensor
    of any other DTensor, plain tensors unchanged."""
    if not isinstance(labels, DTensor):
        return labels
    if all(isinstance(p, Replicate) for p in labels.placements):
        return labels.to_local()
    return labels.full_tensor()
