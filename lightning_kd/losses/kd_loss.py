"""``KDLoss``: forward KL(P_teacher ‖ P_student) for knowledge distillation of language models.

The public loss module. It validates its inputs, selects the valid tokens, picks the
vocabulary-softmax (one process, or a tensor-parallel vocabulary shard) and hands the work to
the chunked engine in :mod:`lightning_kd.losses.engine`. It imports nothing from Lightning so
that it can be used in any PyTorch training loop.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_kd.checks import check_bool, check_int
from lightning_kd.losses.divergences import ForwardKL
from lightning_kd.losses.engine import divergence_over_rows
from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax, resolve_vocab_parallel


class KDLossOutput(NamedTuple):
    """What :meth:`KDLoss.forward` returns with ``return_per_token=True``.

    Attributes:
        loss: 0-dim tensor, the same value the plain call returns (connected to the student).
        per_token_kl: [*] detached ``T² · KL`` per token (labels' shape, the loss's dtype),
            0 where the label is ignored. Computed in the same pass as the loss.
        valid_mask: [*] bool, True where ``labels != ignore_index``.
    """

    loss: Tensor
    per_token_kl: Tensor
    valid_mask: Tensor


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise ValueError(f"temperature must be a real number > 0, got {temperature!r}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}.")
    return float(temperature)


def _check_normaliser(num_batch_labels: int | float | Tensor) -> float:
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


class KDLoss(nn.Module):
    """Forward KL distillation loss over the tokens whose label is not ``ignore_index``.

    For each valid token, with ``P = softmax(teacher / T)`` and ``Q = softmax(student / T)``::

        kl = T² · Σ_v P_v (log P_v − log Q_v)

    and the loss is the mean of ``kl`` over valid tokens, or ``Σ kl / num_batch_labels`` when
    ``num_batch_labels`` (the valid tokens of a whole gradient-accumulation window) is given.
    The gradient flows to the student logits only, in their dtype, and is computed analytically
    (``T · (Q − P) / normaliser``) during the forward pass, chunk by chunk.

    Args:
        ignore_index: label value of tokens to leave out (padding, prompt tokens).
        temperature: softmax temperature ``T`` (finite, > 0); the loss is scaled by ``T²``.
        fp32_upcast: compute softmaxes in fp32 even for bf16/fp16 logits; ``False`` computes in
            the logits' dtype (less memory, less accuracy).
        tp_group: process group over which the vocabulary is sharded, for plain local-shard
            tensors (each rank passes its own vocabulary slice, in rank order). Not needed for
            DTensor logits sharded on the last dim: the group is inferred from their mesh.
        chunk_size: the flattened tokens are processed in windows of ``chunk_size`` positions
            (only their valid tokens are computed); memory then stays at the student gradient
            plus O(chunk_size × V) in forward and backward. 0 processes all tokens at once.

    Raises:
        ValueError: for a non-positive or non-finite temperature, a negative chunk_size, or
            arguments of the wrong type.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        temperature: float = 1.0,
        fp32_upcast: bool = True,
        tp_group: torch.distributed.ProcessGroup | None = None,
        chunk_size: int = 0,
    ) -> None:
        super().__init__()
        check_int("ignore_index", ignore_index)
        check_int("chunk_size (0 = unchunked)", chunk_size, 0)
        check_bool("fp32_upcast", fp32_upcast)
        self.ignore_index = ignore_index
        self.temperature = _check_temperature(temperature)
        self.fp32_upcast = fp32_upcast
        self.tp_group = tp_group
        self.chunk_size = chunk_size
        self.divergence = ForwardKL()

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"fp32_upcast={self.fp32_upcast}, chunk_size={self.chunk_size}, "
            f"tp_group={'set' if self.tp_group is not None else None}"
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        num_batch_labels: int | float | Tensor | None = None,
        *,
        return_per_token: bool = False,
    ) -> Tensor | KDLossOutput:
        """Compute the loss.

        Args:
            student_logits: [*, V] floating logits of the student (any strides), or a DTensor
                (vocab-sharded on the last dim for the tensor-parallel path).
            teacher_logits: [*, V] teacher logits of the same shape and kind; no gradient.
            labels: [*] integer labels (plain tensor or replicated DTensor); only compared with
                ``ignore_index``.
            num_batch_labels: total valid tokens of the gradient-accumulation window (> 0); the
                loss is then ``Σ kl / num_batch_labels`` instead of the mean.
            return_per_token: also return the detached per-token KL (see :class:`KDLossOutput`).

        Returns:
            A 0-dim tensor (fp32 when ``fp32_upcast`` and the logits are half precision, else
            the logits' dtype), or a
            :class:`KDLossOutput` when ``return_per_token`` is True. With no valid token the
            loss is a finite 0 that is still connected to the student (zero gradient).

        Raises:
            ValueError: on mismatched shapes or kinds, non-floating logits, non-integer labels,
                or a non-positive ``num_batch_labels``; raised before any heavy work.
        """
        student, teacher, labels, vocab = resolve_vocab_parallel(
            student_logits, teacher_logits, labels, self.tp_group
        )
        self._check_inputs(student, teacher, labels)
        normaliser = None if num_batch_labels is None else _check_normaliser(num_batch_labels)

        valid = labels != self.ignore_index
        if isinstance(vocab, VocabParallelSoftmax):
            vocab.check_same_rows(valid)
        if normaliser is None:
            normaliser = float(max(int(valid.sum()), 1))
        compute_dtype = torch.promote_types(student.dtype, teacher.dtype)
        if self.fp32_upcast:
            compute_dtype = torch.promote_types(compute_dtype, torch.float32)
        loss, per_row = divergence_over_rows(
            student,
            teacher,
            valid,
            self.divergence,
            vocab,
            temperature=self.temperature,
            normaliser=normaliser,
            chunk_size=self.chunk_size,
            compute_dtype=compute_dtype,
        )
        if not return_per_token:
            return loss
        per_token = torch.zeros(valid.shape, dtype=per_row.dtype, device=per_row.device)
        per_token.view(-1)[valid.reshape(-1).to(per_row.device)] = per_row
        return KDLossOutput(loss, per_token, valid)

    @staticmethod
    def _check_inputs(student: Tensor, teacher: Tensor, labels: Tensor) -> None:
        for name, x in (("student_logits", student), ("teacher_logits", teacher)):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(x).__name__}.")
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
            if x.ndim < 1:
                raise ValueError(f"{name} must have shape [*, V], got a 0-dim tensor.")
        if student.shape != teacher.shape:
            raise ValueError(
                "student_logits and teacher_logits must have the same shape [*, V], got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}."
            )
        if student.device != teacher.device:
            raise ValueError(
                "student_logits and teacher_logits must be on the same device, got "
                f"{student.device} and {teacher.device}."
            )
        if not isinstance(labels, Tensor):
            raise ValueError(f"labels must be an integer tensor, got {type(labels).__name__}.")
        if labels.shape != student.shape[:-1]:
            raise ValueError(
                f"labels must have the logits' leading shape {tuple(student.shape[:-1])}, got "
                f"{tuple(labels.shape)}."
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}.")
