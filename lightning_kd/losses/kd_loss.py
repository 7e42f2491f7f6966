"""``KDLoss``: a divergence between teacher and student for knowledge distillation of LMs.

The public loss module. It validates its inputs, selects the valid tokens, picks the
vocabulary-softmax (one process, or a tensor-parallel vocabulary shard) and hands the work to
the chunked engine in :mod:`lightning_kd.losses.engine`: the divergence (forward KL by default,
see :mod:`lightning_kd.losses.divergences`) and, when mixed in with ``kd_ratio < 1``, the
student's hard-label cross-entropy, both in one bounded pass. It imports nothing from
Lightning so that it can be used in any PyTorch training loop. Its options (and those of the
other losses) are checked in :class:`~lightning_kd.losses.loss_base.KDLossBase`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.losses.engine import PassSpec, distill_over_rows
from lightning_kd.losses.input_checks import (
    check_label_range,
    check_labels_in_vocab,
    check_normaliser,
)
from lightning_kd.losses.loss_base import KDLossBase, KDLossOutput
from lightning_kd.losses.vocab_parallel import resolve_vocab_parallel


class KDLoss(KDLossBase):
    """Distillation loss over the tokens whose label is not ``ignore_index``.

    For each valid token, with ``P = softmax(teacher / T)`` and ``Q = softmax(student / T)``,
    the per-token divergence is ``T² · D(P, Q)`` for the chosen ``divergence``:

    - ``forward_kl`` (default): KL(P ‖ Q)
    - ``reverse_kl``: KL(Q ‖ P)
    - ``jsd`` (``beta``, default 0.5): ``β KL(P ‖ M) + (1 − β) KL(Q ‖ M)`` with
      ``M = β P + (1 − β) Q``; ``β = 0`` is KL(P ‖ Q), ``β = 1`` is KL(Q ‖ P) (TRL's GKD)
    - ``tvd``: ½ Σ |P − Q|
    - ``skew_kl`` (``alpha``, default 0.1): KL(P ‖ α P + (1 − α) Q) (DistiLLM)
    - ``skew_reverse_kl`` (``alpha``, default 0.1): KL(Q ‖ α Q + (1 − α) P) (DistiLLM)

    and the loss is ``kd_ratio · divergence + (1 − kd_ratio) · CE``, each term summed over the
    valid tokens and divided by their count (or by ``num_batch_labels``, the valid tokens of a
    whole gradient-accumulation window), where CE is the student's hard-label cross-entropy
    ``−log softmax(student)[label]`` at temperature 1. Both terms come from one chunked pass
    over the same student rows. The gradient flows to the student logits only, in their dtype,
    and is computed analytically during the forward pass, chunk by chunk.

    Args:
        ignore_index: label value of tokens to leave out (padding, prompt tokens).
        temperature: softmax temperature ``T`` (finite, > 0) of the divergence; it is scaled
            by ``T²``. The cross-entropy term always uses temperature 1.
        fp32_upcast: compute softmaxes in fp32 even for bf16/fp16 logits; ``False`` computes in
            the logits' dtype (less memory, less accuracy).
        tp_group: process group over which the vocabulary is sharded, for plain local-shard
            tensors (each rank passes its own vocabulary slice, in rank order). Not needed for
            DTensor logits sharded on the last dim: the group is inferred from their mesh.
        chunk_size: the flattened tokens are processed in windows of ``chunk_size`` positions
            (only their valid tokens are computed); memory then stays at the student gradient
            plus O(chunk_size × V) in forward and backward. 0 processes all tokens at once.
        divergence: a name from the list above (default parameters) or a
            :class:`~lightning_kd.losses.divergences.Divergence` object such as ``JSD(beta=0.3)``.
        kd_ratio: weight of the divergence in [0, 1]; 1 (default) is pure distillation and
            computes no cross-entropy unless ``return_per_token`` asks for it; 0 trains on the
            labels alone and computes no divergence unless ``return_per_token`` asks for it.
            With ``kd_ratio < 1`` the labels of valid tokens must be vocabulary ids.

    Raises:
        ValueError: for a non-positive or non-finite temperature, a negative chunk_size, a
            ``kd_ratio`` outside [0, 1], an unknown divergence name, an object that is not a
            ``Divergence``, or arguments of the wrong type.
    """

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
            labels: [*] integer labels (plain tensor or replicated DTensor): compared with
                ``ignore_index``, and the cross-entropy targets when that term is computed.
            num_batch_labels: total valid tokens of the gradient-accumulation window (> 0); the
                loss is then ``Σ per-token loss / num_batch_labels`` instead of the mean.
            return_per_token: also return the detached per-token divergence and cross-entropy
                and both terms (see :class:`KDLossOutput`); the cross-entropy is then computed
                even when ``kd_ratio`` is 1.

        Returns:
            A 0-dim tensor (fp32 when ``fp32_upcast`` and the logits are half precision, else
            the logits' dtype), or a :class:`KDLossOutput` when ``return_per_token`` is True.
            With no valid token the loss is a finite 0 that is still connected to the student
            (zero gradient).

        Raises:
            ValueError: on mismatched shapes or kinds, non-floating logits, non-integer labels,
                a non-positive ``num_batch_labels``, or a label that is neither ``ignore_index``
                nor in ``[0, V)``; raised before any heavy work.
        """
        with_ce, with_div = self.mixed_terms(return_per_token)
        student, teacher, labels, vocab = resolve_vocab_parallel(
            student_logits, teacher_logits, labels, self.tp_group
        )
        self._check_inputs(student, teacher, labels)
        normaliser = None if num_batch_labels is None else check_normaliser(num_batch_labels)
        valid, normaliser = self.valid_tokens(labels, vocab, normaliser)
        check_labels_in_vocab(labels, valid, vocab, student)
        compute_dtype = self.compute_dtype(student.dtype, teacher.dtype)
        spec = PassSpec(
            self.divergence if with_div else None,
            self.temperature,
            normaliser,
            self.chunk_size,
            compute_dtype,
            kd_ratio=self.kd_ratio,
            with_ce=with_ce,
        )
        targets = None
        if with_ce:
            targets = labels.reshape(-1).to(student.device, torch.int64)
            offset, vocab_size = vocab.vocab_range(student.shape[-1], student.device)
            spec = spec._replace(label_offset=offset, vocab_size=vocab_size)
            if self.kd_ratio < 1.0:
                check_label_range(targets, valid, vocab_size)
        out = distill_over_rows(student, teacher, valid, vocab, spec, targets)
        return self.output(out, valid, return_per_token)

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


__all__ = ["KDLoss", "KDLossOutput"]
