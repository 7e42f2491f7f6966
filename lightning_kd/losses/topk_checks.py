"""Call-time checks of ``TopKKDLoss``: the top-k teacher data against the student logits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Largest accepted teacher probability mass Σ_i P_i over a token's top-k: a little over 1
#: for rounding and compressed caches; far more means the values are not log-probabilities.
MAX_TOP_MASS = 1.1


def check_topk_shapes(student: Tensor, ids: Tensor, logprobs: Tensor, labels: Tensor) -> None:
    """Shapes, dtypes and devices (no data read).

    Args:
        student: [*, V] (local shard of the) student logits.
        ids: [*, k] integer teacher top-k ids.
        logprobs: [*, k] floating teacher log-probabilities.
        labels: [*] integer labels.

    Raises:
        ValueError: naming the offending argument.
    """
    if not isinstance(student, Tensor) or not student.is_floating_point():
        what = student.dtype if isinstance(student, Tensor) else type(student).__name__
        raise ValueError(f"student_logits must be a floating-point tensor, got {what}.")
    if student.ndim < 1:
        raise ValueError("student_logits must have shape [*, V], got a 0-dim tensor.")
    lead = tuple(student.shape[:-1])
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs), ("labels", labels)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be an integer tensor (int64/int32), got {ids.dtype}.")
    if not logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs must be a floating-point tensor, got {logprobs.dtype}.")
    if ids.ndim != student.ndim or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        raise ValueError(
            f"teacher_ids must have shape [*, k] with the logits' leading shape {lead} and "
            f"k >= 1, got {tuple(ids.shape)}."
        )
    if logprobs.shape != ids.shape:
        raise ValueError(
            "teacher_logprobs must have the shape of teacher_ids "
            f"{tuple(ids.shape)}, got {tuple(logprobs.shape)}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}.")
    if tuple(labels.shape) != lead:
        raise ValueError(
            f"labels must have the logits' leading shape {lead}, got {tuple(labels.shape)}."
        )
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if x.device != student.device:
            raise ValueError(
                f"{name} must be on the student logits' device {student.device}, got {x.device}."
            )


def check_tail_shape(tail: Tensor, labels: Tensor, device: object) -> None:
    """``teacher_tail_logprob``: a floating tensor shaped like ``labels`` on ``device``.

    Raises:
        ValueError: naming what is wrong.
    """
    if not isinstance(tail, Tensor) or not tail.is_floating_point():
        what = tail.dtype if isinstance(tail, Tensor) else type(tail).__name__
        raise ValueError(f"teacher_tail_logprob must be a floating-point tensor, got {what}.")
    if tuple(tail.shape) != tuple(labels.shape):
        raise ValueError(
            f"teacher_tail_logprob must have the labels' shape {tuple(labels.shape)} (one "
            f"log-mass per token), got {tuple(tail.shape)}."
        )
    if tail.device != device:
        raise ValueError(
            f"teacher_tail_logprob must be on the student logits' device {device}, got "
            f"{tail.device}."
        )


def check_topk_values(
    ids: Tensor, logprobs: Tensor, valid: Tensor, vocab_size: int, tail: Tensor | None = None
) -> None:
    """The valid tokens' top-k data: ids distinct vocabulary ids, log-probabilities not NaN or
    +inf, and their probability mass (with the tail's, when given) at most
    :data:`MAX_TOP_MASS`; a given tail log-mass not NaN and at most ``log MAX_TOP_MASS``.
    Reads only valid rows.

    Args:
        ids: [*, k] integer ids; logprobs: [*, k] floating; valid: [*] bool.
        vocab_size: the whole vocabulary size V.
        tail: [*] floating ``log P_rest``, or None.

    Raises:
        ValueError: saying what is wrong, with an offending value.
    """
    k = ids.shape[-1]
    if k > vocab_size:
        raise ValueError(
            f"teacher_ids holds k={k} ids per token, more than the vocabulary {vocab_size}."
        )
    flat_valid = valid.reshape(-1).to(ids.device)
    if not bool(flat_valid.any()):
        return
    rows = ids.reshape(-1, k)[flat_valid].to(torch.int64)
    bad = (rows < 0) | (rows >= vocab_size)
    if bool(bad.any()):
        raise ValueError(
            f"teacher_ids of valid tokens must be vocabulary ids in [0, {vocab_size}), got "
            f"{int(rows[bad][0])}."
        )
    ordered = rows.sort(-1).values
    same = ordered[:, 1:] == ordered[:, :-1]
    if bool(same.any()):
        raise ValueError(
            "teacher_ids must be distinct within a token, got id "
            f"{int(ordered[:, 1:][same][0])} twice in a valid token's top-k."
        )
    lp = logprobs.reshape(-1, k)[flat_valid].to(torch.float64)
    if bool((lp.isnan() | (lp == torch.inf)).any()):
        raise ValueError("teacher_logprobs of valid tokens must not be NaN or +inf.")
    top_mass = lp.exp().sum(-1)
    if tail is not None:
        rest = tail.reshape(-1)[flat_valid].to(torch.float64)
        if bool((rest.isnan() | (rest > math.log(MAX_TOP_MASS))).any()):
            raise ValueError(
                "teacher_tail_logprob of valid tokens must be the log of the teacher's mass "
                "outside the top-k (<= 0, -inf for none), got NaN or a positive value."
            )
        top_mass = top_mass + rest.exp()
    mass = float(top_mass.max())
    if mass > MAX_TOP_MASS:
        raise ValueError(
            "teacher_logprobs must be the teacher's log-probabilities (log_softmax of its logits "
            f"at the loss's temperature, gathered): a valid token's top-k mass is {mass:.4g} > 1."
        )
