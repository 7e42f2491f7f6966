"""Distances between a student's and a teacher's hidden states (intermediate-layer distillation).

Plain PyTorch, no Lightning. Each distance is a per-token value averaged over the valid tokens
(the same normalisation as the logit losses, so the terms add up per token):

- ``"mse"``: ``mean_d (s - t)²`` (DistillKit's hidden-state MSE);
- ``"cosine"``: ``1 - cos(s, t)`` (DistilBERT's cosine embedding loss, target +1; ModelOpt);
- ``"normalized_mse"``: ``sum_d (s - t)² / sum_d t²`` (the MSE relative to the teacher's
  energy at that token: scale-free across layers whose norms grow with depth).

All are computed in fp32 whatever the inputs' dtype.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["HIDDEN_DISTANCES", "check_distance", "hidden_state_distance"]

#: The distances :func:`hidden_state_distance` knows.
HIDDEN_DISTANCES = ("mse", "cosine", "normalized_mse")

#: Keeps the normalised MSE finite on an all-zero teacher vector.
_EPS = 1e-8


def check_distance(distance: str) -> str:
    """``distance`` when it is one of :data:`HIDDEN_DISTANCES`.

    Raises:
        ValueError: for any other value.
    """
    if distance not in HIDDEN_DISTANCES:
        raise ValueError(f"distance must be one of {HIDDEN_DISTANCES}, got {distance!r}.")
    return distance


def per_token_distance(student: Tensor, teacher: Tensor, distance: str) -> Tensor:
    """The distance at each position: ``student``/``teacher`` [*, d] -> [*] fp32."""
    s, t = student.float(), teacher.float()
    if distance == "mse":
        return (s - t).pow(2).mean(-1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=_EPS)
    return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(_EPS)


def hidden_state_distance(
    student: Tensor, teacher: Tensor, valid_mask: Tensor, distance: str = "mse"
) -> Tensor:
    """Mean distance over the valid tokens between two hidden-state tensors.

    Args:
        student: [B, S, d] student hidden states (already projected to the teacher's width),
            any float dtype; the gradient flows into it.
        teacher: [B, S, d] teacher hidden states (detached by the caller).
        valid_mask: [B, S] bool, True at the tokens that count (the labels not ignored).
        distance: one of :data:`HIDDEN_DISTANCES`.

    Returns:
        0-dim fp32: the per-token mean over the valid tokens (0, still connected to
        ``student``, when there is none).

    Raises:
        ValueError: for an unknown distance, mismatched shapes or a mask of another shape.
    """
    check_distance(distance)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher hidden states must have the same shape [B, S, d] (project "
            f"the student's width first), got {tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    if valid_mask.shape != student.shape[:-1]:
        raise ValueError(
            f"valid_mask must be [B, S] = {tuple(student.shape[:-1])}, got "
            f"{tuple(valid_mask.shape)}."
        )
    values = per_token_distance(student, teacher, distance)
    mask = valid_mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
