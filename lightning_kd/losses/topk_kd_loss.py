"""``TopKKDLoss``: distillation from a teacher's stored top-k distribution (an offline cache).

The student is compared with the teacher on k + 1 buckets: the teacher's top-k tokens and one
bucket for the rest of the vocabulary (see :mod:`lightning_kd.losses.topk_buckets`). The pass
is :class:`~lightning_kd.KDLoss`'s chunked engine (:mod:`lightning_kd.losses.engine`): bounded
memory, the gradient written during the forward pass, the hard-label cross-entropy mixed in
the same pass, and the vocabulary-parallel softmax for sharded student logits. It imports
nothing from Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.losses.engine import PassSpec, distill_over_rows
from lightning_kd.losses.input_checks import check_label_range, check_normaliser, local_labels
from lightning_kd.losses.kd_loss import KDLossOutput
from lightning_kd.losses.loss_base import KDLossBase
from lightning_kd.losses.topk_buckets import bucketed, pack_topk
from lightning_kd.losses.topk_checks import check_tail_shape, check_topk_shapes, check_topk_values
from lightning_kd.losses.vocab_parallel import resolve_vocab_parallel


class TopKKDLoss(KDLossBase):
    """Distillation loss against a teacher known only by its top-k tokens per position.

    For each valid token (``labels != ignore_index``) the teacher gives k distinct vocabulary
    ids and their log-probabilities ``log P_i`` at temperature ``T``, and optionally the log of
    the rest's mass ``log P_rest`` (default ``log max(1 − Σ_i P_i, 0)``; empty when k = V). The
    student's buckets are ``Q_i = softmax(s / T)[id_i]`` and ``Q_rest = 1 − Σ_i Q_i`` (computed
    as the tail's own sum, accurate when tiny). The per-token value is ``T² · D`` on these
    k + 1 buckets, for any divergence ``D`` of :class:`~lightning_kd.KDLoss`:

    - ``forward_kl`` (default): KL(P ‖ Q) = ``Σ_i P_i log(P_i / Q_i) + P_rest log(P_rest /
      Q_rest)``, 0·log 0 = 0
    - ``reverse_kl``: KL(Q ‖ P) on the same buckets (infinite for a token whose ``P_rest`` is 0
      while ``Q_rest`` is not, e.g. a top-k mass rounded to ≥ 1 with k < V: pass the tail's
      log-mass where it is known)
    - ``jsd`` (any β), ``tvd``, ``skew_kl``, ``skew_reverse_kl`` (any α), or a user's
      ``Divergence``: ``D`` of the two (k + 1)-bucket distributions, by ``D``'s own math (see
      :mod:`lightning_kd.losses.topk_buckets`).

    These are the divergences of the coarsened distributions, lower bounds of the
    full-vocabulary ones (merging outcomes never increases an f-divergence), 0 when the
    student's buckets equal the teacher's, and equal to ``KDLoss``'s divergence when k = V.
    The loss is ``kd_ratio · divergence + (1 − kd_ratio) · CE`` with the
    student's hard-label cross-entropy at temperature 1, each term summed over the valid tokens
    and divided by their count (or ``num_batch_labels``); one chunked pass, the gradient
    (student logits only) computed analytically during the forward.

    Args:
        ignore_index: label value of tokens to leave out (padding, prompt tokens).
        temperature: ``T`` (finite, > 0); the loss is scaled by ``T²``. The teacher's
            log-probabilities must already be at this temperature (they are used as given).
        fp32_upcast: compute in fp32 even for bf16/fp16 logits.
        tp_group: process group of a vocabulary sharded over plain local-shard student logits
            (each rank its slice, in rank order); not needed for DTensor logits sharded on the
            last dim.
        chunk_size: process the flattened tokens in windows of this many positions (memory
            O(chunk_size × V) plus the student gradient); 0 processes all at once.
        divergence: a name of :data:`~lightning_kd.losses.DIVERGENCES` or a ``Divergence``
            object (e.g. ``JSD(beta=0.1)``).
        kd_ratio: weight of the divergence in [0, 1]; with ``kd_ratio < 1`` the labels of valid
            tokens must be vocabulary ids.

    Raises:
        ValueError: for the arguments ``KDLoss`` refuses.
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_ids: Tensor,
        teacher_logprobs: Tensor,
        labels: Tensor,
        num_batch_labels: int | float | Tensor | None = None,
        *,
        return_per_token: bool = False,
        teacher_tail_logprob: Tensor | None = None,
    ) -> Tensor | KDLossOutput:
        """Compute the loss.

        Args:
            student_logits: [*, V] floating student logits (any strides): plain, a DTensor
                sharded on the last dim, or this rank's vocabulary slice with ``tp_group``.
            teacher_ids: [*, k] integer (int64/int32) global vocabulary ids of the teacher's
                top-k tokens, distinct within a token, any order; plain tensors, the same on
                every tensor-parallel rank. Read only where the label is valid.
            teacher_logprobs: [*, k] floating ``log_softmax(teacher_logits / T)`` at those
                ids; no gradient.
            labels: [*] integer labels (the CE targets when that term is computed).
            num_batch_labels: total valid tokens of the gradient-accumulation window (> 0).
            return_per_token: also return the per-token values (see
                :class:`~lightning_kd.KDLossOutput`).
            teacher_tail_logprob: [*] floating ``log P_rest``, the log of the teacher's mass
                outside the top-k (``−inf`` for none), e.g. from a teacher cache; None: implied
                as ``log max(1 − Σ_i P_i, 0)`` (inaccurate for tails below ~1e-7).

        Returns:
            A 0-dim tensor (fp32 when ``fp32_upcast`` and the inputs are half precision), or a
            :class:`~lightning_kd.KDLossOutput`. With no valid token: a finite 0 connected to
            the student.

        Raises:
            ValueError: on mismatched shapes, kinds or devices, non-integer ids or labels,
                non-floating logits or log-probabilities, a non-positive ``num_batch_labels``;
                for a valid token: ids outside ``[0, V)`` or repeated, NaN or +inf
                log-probabilities, a top-k mass above 1.1 (not log-probabilities), a tail
                log-mass that is NaN or above 0 (or of the wrong shape or kind), or (with
                ``kd_ratio < 1``) a label outside ``[0, V)``. Raised before the pass.
        """
        with_ce, with_div = self.mixed_terms(return_per_token)
        student, _, labels, vocab = resolve_vocab_parallel(
            student_logits, student_logits, labels, self.tp_group
        )
        ids, logprobs = local_labels(teacher_ids), local_labels(teacher_logprobs)
        check_topk_shapes(student, ids, logprobs, labels)
        tail = None
        if teacher_tail_logprob is not None:
            tail = local_labels(teacher_tail_logprob)
            check_tail_shape(tail, labels, student.device)
        normaliser = None if num_batch_labels is None else check_normaliser(num_batch_labels)
        valid, normaliser = self.valid_tokens(labels, vocab, normaliser)
        offset, vocab_size = vocab.vocab_range(student.shape[-1], student.device)
        check_topk_values(ids, logprobs, valid, vocab_size, tail)
        compute_dtype = self.compute_dtype(student.dtype, logprobs.dtype)
        spec = PassSpec(
            bucketed(self.divergence, offset, vocab_size) if with_div else None,
            self.temperature,
            normaliser,
            self.chunk_size,
            compute_dtype,
            kd_ratio=self.kd_ratio,
            with_ce=with_ce,
            label_offset=offset,
            vocab_size=vocab_size,
        )
        targets = None
        if with_ce:
            targets = labels.reshape(-1).to(student.device, torch.int64)
            if self.kd_ratio < 1.0:
                check_label_range(targets, valid, vocab_size)
        packed = pack_topk(ids, logprobs, tail)
        out = distill_over_rows(student, packed, valid, vocab, spec, targets)
        return self.output(out, valid, return_per_token)
