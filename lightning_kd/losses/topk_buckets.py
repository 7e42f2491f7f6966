"""Divergences on a (k+1)-bucket distribution: a teacher's top-k tokens plus one tail bucket.

A top-k teacher (an offline cache, a served teacher) gives, per token, only the teacher's
top-k vocabulary ids, their log-probabilities and, when known, the log of the rest's mass.
:class:`~lightning_kd.losses.topk_kd_loss.TopKKDLoss` compares the student with that on k + 1
buckets: the k tokens, and one bucket for the rest of the vocabulary. With ``P_i`` the
teacher's probabilities of the ids, ``P_rest`` its tail mass (stored as ``log P_rest``, or
``max(1 − Σ_i P_i, 0)`` when not given; 0 when k = V: the tail is empty),
``Q = softmax(s / T)`` the student's, ``Q_i = Q[id_i]`` and ``Q_rest = Σ_{j ∉ top-k} Q_j``:

- forward KL: ``Σ_i P_i (log P_i − log Q_i) + P_rest (log P_rest − log Q_rest)``; gradient
  w.r.t. ``z = s / T``: ``S Q_j − P_j`` in the top-k and ``Q_j (S − P_rest / Q_rest)`` outside,
  with ``S = Σ_i P_i + P_rest`` (1 unless the stored top-k mass exceeds 1 by rounding).
- reverse KL: ``Σ_i Q_i (log Q_i − log P_i) + Q_rest (log Q_rest − log P_rest)``; gradient
  ``Q_j (r_j − D)`` with ``r_j = log Q_j − log P_j`` in the top-k and
  ``log Q_rest − log P_rest`` outside (``D`` the value).
- every other divergence ``D`` (JSD(β), TVD, skew KLs, or a user's
  :class:`~lightning_kd.losses.divergences.Divergence`): ``D(P_b, Q_b)`` on the bucket
  distributions ``P_b = (P_1, …, P_k, P_rest)`` and ``Q_b = (Q_1, …, Q_k, Q_rest)``
  (:class:`BucketedDivergence`), computed by ``D``'s own chunk math on the [m, k + 1] bucket
  rows in float64 (the teacher's buckets renormalised to sum 1: a no-op up to rounding). Its
  gradient w.r.t. ``z_j`` is ``(Q_j / Q_b(j)) · G_b(j)``, with ``G`` the gradient w.r.t. the
  bucket log-probabilities and ``b(j)`` the bucket of ``j``.

These are the divergences of the coarsened distributions: every f-divergence (KL both ways,
JSD, TVD, the skew KLs) can only shrink when outcomes are merged (the data-processing
inequality), so each is a lower bound of the full-vocabulary one, equal to it when k = V. All
are 0 when the student's bucketed distribution equals the teacher's. ``Q_rest`` is a
log-sum-exp over the non-top-k entries (never ``1 − Σ Q_i``), so it stays accurate when tiny;
``P_rest`` is accurate when tiny only if given as its log (``1 − Σ P_i`` of float32
log-probabilities reads a tail below ~1e-7 as 0, where reverse KL is infinite).

These objects plug into the chunked engine (:mod:`lightning_kd.losses.engine`) as a
:class:`~lightning_kd.losses.divergences.Divergence` whose "teacher rows" are the packed top-k
rows of :func:`pack_topk`. On a tensor-parallel vocabulary shard each rank handles the ids in
its shard; the per-row collectives are the softmax normaliser (two all-reduces), the tail's
maximum (one) and the packed partial sums: two values per row for forward and reverse KL,
``k + 1`` per row (the student's bucket log-probabilities) for the others.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kd.losses.divergences import Divergence, ForwardKL, ReverseKL
from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax
from lightning_kd.losses.vocab_softmax import LocalVocabSoftmax, VocabSoftmax


def implied_tail_logprob(teacher_logprobs: Tensor) -> Tensor:
    """``log max(1 − Σ_i P_i, 0)`` per token (``−inf`` where the top-k mass is 1 or more): the
    tail when only the top-k log-probabilities are known. Computed in their own precision (at
    least float32), so that a mass that is 1 up to their rounding leaves no tail.
    [*, k] -> [*]."""
    dtype = torch.promote_types(teacher_logprobs.dtype, torch.float32)
    mass = teacher_logprobs.to(dtype).exp().sum(-1)
    return (1.0 - mass).clamp_min(0.0).log()


def pack_topk(
    teacher_ids: Tensor, teacher_logprobs: Tensor, teacher_tail_logprob: Tensor | None = None
) -> Tensor:
    """The top-k data as one [*, 2k + 1] float64 tensor the engine can chunk like logits.

    Args:
        teacher_ids: [*, k] integer vocabulary ids (exact in float64 below 2**53).
        teacher_logprobs: [*, k] floating log-probabilities.
        teacher_tail_logprob: [*] ``log P_rest``, or None for :func:`implied_tail_logprob`.

    Returns:
        [*, 2k + 1] float64: the log-probabilities, the ids, then ``log P_rest``.
    """
    if teacher_tail_logprob is None:
        tail = implied_tail_logprob(teacher_logprobs)
    else:
        tail = teacher_tail_logprob.to(torch.float64)
    return torch.cat(
        [teacher_logprobs.to(torch.float64), teacher_ids.to(torch.float64), tail.unsqueeze(-1)],
        -1,
    )


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

    Built from ``student`` [m, V_local] logit rows and ``packed`` [m, 2k + 1] rows of
    :func:`pack_topk`; ``work`` [m, V_local] (compute dtype) holds ``log Q`` with the owned top-k
    entries at ``-inf``, then (after :meth:`reduce`) ``Q_j / exp(tail_max)`` of the tail.

    Attributes:
        owned: [m, k] bool, the top-k entries in this rank's shard (all of them on one process).
        index: [m, k] their local columns (clamped into the shard where not owned).
        log_p, p: [m, k] teacher log-probabilities and probabilities.
        log_p_rest, p_rest: [m] teacher tail log-mass and mass (``−inf`` and 0 when k = V);
            ``log_p_rest64`` the float64 log-mass.
        packed: the [m, 2k + 1] float64 rows.
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
        self.work, self.packed, self.k = work, packed, k
        self.log_p = packed[:, :k].to(dtype)
        self.p = self.log_p.exp()
        tail = packed[:, 2 * k]
        if k == vocab_size:  # distinct ids covering the vocabulary: the tail is empty
            tail = torch.full_like(tail, -math.inf)
        self.log_p_rest64 = tail
        self.log_p_rest = tail.to(dtype)
        self.p_rest = self.log_p_rest.exp()
        local = packed[:, k : 2 * k].to(torch.int64) - offset
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

    def reduce_buckets(self, vocab: VocabSoftmax) -> tuple[Tensor, Tensor, Tensor]:
        """``(log Q_i [m, k] of every top-k entry, log Q_rest [m], Σ_tail work [m])`` from one
        all-reduce of k + 1 values per row (each id is owned by one rank); turns ``work`` into
        the tail's ``exp(log Q − tail_max)`` like :meth:`reduce`."""
        tail = self.work.sub_(self.tail_max).exp_().sum(-1)
        both = vocab.all_sum(torch.cat([self.on_owned(self.log_q_top), tail.unsqueeze(1)], 1))
        log_q_rest = both[:, self.k].log() + self.tail_max.squeeze(1)
        return both[:, : self.k], log_q_rest, both[:, self.k]

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
        value = top + _xlogy(b.p_rest, b.log_p_rest - log_q_rest)
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
        ratio_rest = log_q_rest - b.log_p_rest
        value = top + _xlogy(q_rest, ratio_rest)
        if need_grad:
            # Outside: Q_j (ratio_rest − D), Q_j = work · exp(tail_max); inside: Q_i (ratio_i − D).
            coef = torch.where(q_rest == 0, 0.0, (ratio_rest - value) * b.tail_max.squeeze(1).exp())
            b.write_grad(grad, coef, _xlogy(q_top, ratio_top - value.unsqueeze(1)))
        return value


class BucketedDivergence(Divergence):
    """Any divergence on the top-k + tail buckets: ``D(P_b, Q_b)`` computed by ``D``'s own
    chunk math on the [m, k + 1] bucket rows in float64 (see the module docstring).

    Args:
        divergence: the full-vocabulary divergence (its parameters, e.g. JSD's ``beta``, apply).
        offset: vocabulary id of this rank's first column (0 on one process).
        vocab_size: the whole vocabulary size V (k = V means an empty tail).
    """

    def __init__(self, divergence: Divergence, offset: int, vocab_size: int) -> None:
        self.divergence = divergence
        self.offset = offset
        self.vocab_size = vocab_size

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.divergence.name

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        b = _Buckets(student, teacher, temperature, vocab, work, self.offset, self.vocab_size)
        log_q_top, log_q_rest, tail_sum = b.reduce_buckets(vocab)
        k, f64 = b.k, torch.float64
        q_rows = torch.cat([log_q_top, log_q_rest.unsqueeze(1)], 1).to(f64)
        p_rows = torch.cat([b.packed[:, :k], b.log_p_rest64.unsqueeze(1)], 1)  # float64
        bufs = [torch.empty_like(q_rows) for _ in range(2 + self.divergence.extra_workspaces)]
        kwargs = {"extra": tuple(bufs[2:])} if len(bufs) > 2 else {}
        # Temperature 1: the rows are already log-probabilities at the loss's temperature, so
        # the bucket gradient G is w.r.t. log Q_b, and d/dz_j = (Q_j / Q_b(j)) · G_b(j).
        value = self.divergence.chunk(
            q_rows, p_rows, 1.0, LocalVocabSoftmax(), bufs[0], bufs[1], need_grad, **kwargs
        )
        if need_grad:
            bucket_grad = bufs[1].to(work.dtype)
            # Outside the top-k: Q_j / Q_rest = work_j / Σ_tail work (finite however small).
            coef = torch.where(tail_sum == 0, 0.0, bucket_grad[:, k] / tail_sum)
            b.write_grad(grad, coef, bucket_grad[:, :k])
        return value.to(work.dtype)


#: Bucketed forms with their own closed-form chunk math (two values per row communicated
#: under tensor parallelism); every other divergence goes through :class:`BucketedDivergence`.
BUCKETED: dict[type[Divergence], type[Divergence]] = {
    ForwardKL: BucketedForwardKL,
    ReverseKL: BucketedReverseKL,
}


def bucketed(divergence: Divergence, offset: int, vocab_size: int) -> Divergence:
    """The bucketed form of ``divergence`` for a rank whose vocabulary shard starts at
    ``offset`` in a vocabulary of ``vocab_size``."""
    special = BUCKETED.get(type(divergence))
    if special is not None:
        return special(offset, vocab_size)
    return BucketedDivergence(divergence, offset, vocab_size)
