"""Divergences on a (k+1)-bucket distribution: a teacher's top-k tokens plus one tail bucket.

An offline teacher cache keeps, per token, only the teacher's top-k vocabulary ids and their
log-probabilities. :class:`~lightning_kd.losses.topk_kd_loss.TopKKDLoss` compares the student
with that on k + 1 buckets: the k tokens, and one bucket for the rest of the vocabulary. With
``P_i`` the teacher's probabilities of the ids, ``P_rest = max(1 − Σ_i P_i, 0)`` (0 when k = V:
the tail is empty), ``Q = softmax(s / T)`` the student's, ``Q_i = Q[id_i]`` and
``Q_rest = Σ_{j ∉ top-k} Q_j``:

- forward KL: ``Σ_i P_i (log P_i − log Q_i) + P_rest (log P_rest − log Q_rest)``; gradient
  w.r.t. ``z = s / T``: ``S Q_j − P_j`` in the top-k and ``Q_j (S − P_rest / Q_rest)`` outside,
  with ``S = Σ_i P_i + P_rest`` (1 unless the stored top-k mass exceeds 1 by rounding).
- reverse KL: ``Σ_i Q_i (log Q_i − log P_i) + Q_rest (log Q_rest − log P_rest)``; gradient
  ``Q_j (r_j − D)`` with ``r_j = log Q_j − log P_j`` in the top-k and
  ``log Q_rest − log P_rest`` outside (``D`` the value).

Both are 0 when the student's bucketed distribution equals the teacher's, and equal the full
divergence when k = V. ``Q_rest`` is a log-sum-exp over the non-top-k entries (never
``1 − Σ Q_i``), so it stays accurate when tiny.

These objects plug into the chunked engine (:mod:`lightning_kd.losses.engine`) as a
:class:`~lightning_kd.losses.divergences.Divergence` whose "teacher rows" are the packed top-k
rows of :func:`pack_topk`. On a tensor-parallel vocabulary shard each rank handles the ids in
its shard; the per-row collectives are O(rows): the softmax normaliser (two all-reduces), the
tail's maximum (one) and the packed partial sums (one, two values per row).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kd.losses.divergences import Divergence, ForwardKL, ReverseKL
from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax
from lightning_kd.losses.vocab_softmax import VocabSoftmax


def pack_topk(teacher_ids: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """The top-k data as one [*, 2k] float64 tensor the engine can chunk like teacher logits.

    Args:
        teacher_ids: [*, k] integer vocabulary ids (exact in float64 below 2**53).
        teacher_logprobs: [*, k] floating log-probabilities.

    Returns:
        [*, 2k] float64: the log-probabilities, then the ids.
    """
    return torch.cat([teacher_logprobs.to(torch.float64), teacher_ids.to(torch.float64)], -1)


def _row_max(x: Tensor, vocab: VocabSoftmax) -> Tensor:
    """Row maxima [n, 1] of ``x`` [n, V_local] over the whole (possibly sharded) vocabulary;
    rows that are ``-inf`` everywhere give 0 (a harmless shift)."""
    local = x.amax(-1, keepdim=True)
    if isinstance(vocab, VocabParallelSoftmax):
        buf = local.to(torch.promote_types(local.dtype, torch.float32)).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=vocab.group)  # gloo lacks bf16 ops
        local = buf.to(x.dtype)
    return local.masked_fill_(torch.isinf(local), 0.0)


class _Buckets:
    """One chunk's bucket quantities, shared by both divergences.

    Built from ``student`` [m, V_local] logit rows and ``packed`` [m, 2k] rows of
    :func:`pack_topk`; ``work`` [m, V_local] (compute dtype) holds ``log Q`` with the owned top-k
    entries at ``-inf``, then (after :meth:`reduce`) ``Q_j / exp(tail_max)`` of the tail.

    Attributes:
        owned: [m, k] bool, the top-k entries in this rank's shard (all of them on one process).
        index: [m, k] their local columns (clamped into the shard where not owned).
        log_p, p: [m, k] teacher log-probabilities and probabilities.
        p_rest: [m] teacher tail mass, 0 when k = V.
        log_q_top: [m, k] student ``log Q_i`` (meaningless where not owned).
        tail_max: [m, 1] row maximum of the tail's ``log Q`` (0 for an empty tail).
    """

    def __init__(
        self,
        student: Tensor,
        packed: Tensor,
        temperature: float,
        vocab: VocabSoftmax,
        work: Tensor,
        offset: int,
        vocab_size: int,
    ) -> None:
        k, local_size = packed.shape[-1] // 2, student.shape[-1]
        dtype = work.dtype
        self.work = work
        self.log_p = packed[:, :k].to(dtype)
        self.p = self.log_p.exp()
        if k == vocab_size:  # distinct ids covering the vocabulary: the tail is empty
            self.p_rest = torch.zeros(self.p.shape[0], dtype=dtype, device=work.device)
        else:
            self.p_rest = (1.0 - self.p.sum(-1)).clamp_min_(0.0)
        local = packed[:, k:].to(torch.int64) - offset
        self.owned = (local >= 0) & (local < local_size)
        self.index = local.clamp_(0, local_size - 1)
        log_q = vocab.log_softmax(student, temperature, out=work)
        self.log_q_top = log_q.gather(1, self.index)
        # Owned entries to -inf; the others add 0 to whatever column they were clamped to.
        log_q.scatter_add_(1, self.index, self.on_owned(torch.full_like(self.p, -math.inf)))
        self.tail_max = _row_max(log_q, vocab)

    def on_owned(self, terms: Tensor) -> Tensor:
        """``terms`` [m, k] where owned, 0 elsewhere."""
        return torch.where(self.owned, terms, 0.0)

    def reduce(self, top_terms: Tensor, vocab: VocabSoftmax) -> tuple[Tensor, Tensor, Tensor]:
        """``(Σ_i top_terms, log Q_rest, Σ_tail work)``, each [m], from one packed all-reduce
        of two values per row (``top_terms`` [m, k], summed over the owned entries). Turns
        ``work`` into ``exp(log Q − tail_max)`` (0 on the top-k entries), so
        ``Q_rest = Σ_tail work · exp(tail_max)``."""
        tail = self.work.sub_(self.tail_max).exp_().sum(-1)
        top = self.on_owned(top_terms).sum(-1)
        both = vocab.all_sum(torch.stack([top, tail], 1))
        log_q_rest = both[:, 1].log() + self.tail_max.squeeze(1)
        return both[:, 0], log_q_rest, both[:, 1]

    def write_grad(self, grad: Tensor, tail_coef: Tensor, top: Tensor) -> None:
        """``grad = Q_j · c`` outside the top-k and ``top`` [m, k] on the owned entries, from
        the row coefficients ``tail_coef = c · exp(tail_max)`` [m] (bounded: ``Q_j ≤ Q_rest``)."""
        torch.mul(self.work, tail_coef.unsqueeze(1), out=grad)  # 0 on the top-k entries
        grad.scatter_add_(1, self.index, self.on_owned(top))


def _xlogy(weight: Tensor, log_ratio: Tensor) -> Tensor:
    """``weight · log_ratio`` with 0 where ``weight == 0`` (0·log 0 = 0)."""
    return torch.where(weight == 0, 0.0, weight * log_ratio)


class BucketedForwardKL(Divergence):
    """Forward KL(P ‖ Q) on the top-k + tail buckets (see the module docstring).

    Args:
        offset: vocabulary id of this rank's first column (0 on one process).
        vocab_size: the whole vocabulary size V (k = V means an empty tail).
    """

    name = "forward_kl"

    def __init__(self, offset: int, vocab_size: int) -> None:
        self.offset = offset
        self.vocab_size = vocab_size

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        b = _Buckets(student, teacher, temperature, vocab, work, self.offset, self.vocab_size)
        top, log_q_rest, tail_sum = b.reduce(_xlogy(b.p, b.log_p - b.log_q_top), vocab)
        value = top + _xlogy(b.p_rest, b.p_rest.log() - log_q_rest)
        if need_grad:
            mass = b.p.sum(-1) + b.p_rest  # S (1 up to rounding)
            # Outside: Q_j (S − P_rest / Q_rest) = Q_j / Q_rest · (S Q_rest − P_rest), and
            # Q_j / Q_rest = work_j / Σ_tail work: finite however small Q_rest.
            coef = (mass * log_q_rest.exp() - b.p_rest) / tail_sum
            coef = torch.where(tail_sum == 0, 0.0, coef)  # empty or all -inf tail
            b.write_grad(grad, coef, b.log_q_top.exp() * mass.unsqueeze(1) - b.p)
        return value


class BucketedReverseKL(Divergence):
    """Reverse KL(Q ‖ P) on the top-k + tail buckets (see the module docstring). Infinite for
    a token whose teacher tail mass ``P_rest`` is 0 while the student's tail is not (a top-k
    mass that rounds to ≥ 1 with k < V).

    Args:
        offset: vocabulary id of this rank's first column (0 on one process).
        vocab_size: the whole vocabulary size V (k = V means an empty tail).
    """

    name = "reverse_kl"

    def __init__(self, offset: int, vocab_size: int) -> None:
        self.offset = offset
        self.vocab_size = vocab_size

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        b = _Buckets(student, teacher, temperature, vocab, work, self.offset, self.vocab_size)
        q_top = b.log_q_top.exp()
        ratio_top = b.log_q_top - b.log_p  # log Q_i − log P_i
        top, log_q_rest, _ = b.reduce(_xlogy(q_top, ratio_top), vocab)
        q_rest = log_q_rest.exp()
        ratio_rest = log_q_rest - b.p_rest.log()
        value = top + _xlogy(q_rest, ratio_rest)
        if need_grad:
            # Outside: Q_j (ratio_rest − D), Q_j = work · exp(tail_max); inside: Q_i (ratio_i − D).
            coef = torch.where(q_rest == 0, 0.0, (ratio_rest - value) * b.tail_max.squeeze(1).exp())
            b.write_grad(grad, coef, _xlogy(q_top, ratio_top - value.unsqueeze(1)))
        return value


#: The divergences :class:`~lightning_kd.losses.topk_kd_loss.TopKKDLoss` supports, by the
#: full-vocabulary divergence type they stand for.
BUCKETED: dict[type[Divergence], type[Divergence]] = {
    ForwardKL: BucketedForwardKL,
    ReverseKL: BucketedReverseKL,
}
