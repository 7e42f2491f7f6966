"""Tensor-parallel KDLoss: a softmax over a vocabulary sharded across ranks, and input routing.

Under tensor parallelism the lm_head is column-parallel, so logits arrive as DTensors sharded on
the vocabulary (last) dimension. Gathering them would cost a full ``[tokens, V]`` tensor per
rank. Instead :class:`VocabParallelSoftmax` computes the global softmax from the local shard
with two O(tokens) all-reduces (row maxima, then shifted exp-sums) and sums per-row partial
results with a third, so the divergences of :mod:`lightning_kd.losses.divergences` run
unchanged on the shard. Their gradient w.r.t. the local student shard is the matching slice of
the full gradient and needs no communication; nothing here goes through autograd-aware
collectives or ``loss_parallel()``, which both give wrong KD gradients: ``loss_parallel()``
passes the gradient of a ``log_softmax`` through unchanged (right only when ``nll_loss``
consumes it), and an autograd-aware all-reduce of a per-token result that every rank then uses
multiplies the gradient by the TP size.

:func:`resolve_vocab_parallel` is what ``KDLoss`` calls first: it validates DTensor inputs,
infers the tensor-parallel group (:func:`find_vocab_tp_group`) and returns local tensors plus
the vocabulary-softmax to use.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_kd.losses.vocab_softmax import LocalVocabSoftmax


def _is_vocab_shard(placement: object, ndim: int) -> bool:
    return isinstance(placement, Shard) and placement.dim in (-1, ndim - 1)


def find_vocab_tp_group(logits: Tensor) -> dist.ProcessGroup | None:
    """The process group over which ``logits`` is sharded on its last (vocabulary) dimension.

    Args:
        logits: a tensor; only a DTensor can be vocab-sharded.

    Returns:
        The group of the mesh dimension that carries ``Shard(-1)`` (``Shard(ndim - 1)``), for
        1-D meshes and for Lightning's 2-D ``("data_parallel", "tensor_parallel")`` mesh alike;
        None for plain tensors and for DTensors not sharded on the vocabulary.
    """
    if not isinstance(logits, DTensor):
        return None
    for mesh_dim, placement in enumerate(logits.placements):
        if _is_vocab_shard(placement, logits.ndim):
            return logits.device_mesh.get_group(mesh_dim)
    return None


def _all_reduce(x: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> Tensor:
    """All-reduce of a small per-row tensor, carried in at least fp32 (gloo lacks bf16 ops)."""
    buf = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(x.dtype)


class VocabParallelSoftmax(LocalVocabSoftmax):
    """Softmax over a vocabulary sharded across ``group``: each rank holds a [n, V_local] slice.

    Every method is collective: all ranks of ``group`` must call it with the same rows, in the
    same order. Communication is O(n) per call, never O(n × V).
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        # The global log-normaliser of the last tensor seen, reused when a divergence asks for
        # both log_softmax(x) and softmax(x) of the same chunk. A weak reference: once the
        # chunk is freed the entry can never match another tensor.
        self._last: tuple[weakref.ref, float, Tensor] | None = None

    def _log_normaliser(self, x: Tensor, temperature: float, out: Tensor) -> Tensor:
        """Global ``logsumexp(x / T)`` per row, [n, 1]; overwrites ``out``."""
        if self._last is not None and self._last[0]() is x and self._last[1] == temperature:
            return self._last[2]
        z = self.load(x, temperature, out)
        row_max = _all_reduce(z.amax(-1, keepdim=True), dist.ReduceOp.MAX, self.group)
        row_max.masked_fill_(torch.isinf(row_max), 0.0)  # rows masked everywhere stay -inf
        local_sum = z.sub_(row_max).exp_().sum(-1, keepdim=True)
        lse = row_max + _all_reduce(local_sum, dist.ReduceOp.SUM, self.group).log()
        self._last = (weakref.ref(x), temperature, lse)
        return lse

    def _load_shifted(self, x: Tensor, temperature: float, out: Tensor) -> Tensor:
        """``out = x / T − logsumexp_global(x / T)``, using ``out`` as the only buffer."""
        lse = self._log_normaliser(x, temperature, out)
        return self.load(x, temperature, out).sub_(lse)

    def check_same_rows(self, valid: Tensor, labels: Tensor | None = None) -> None:
        """Raise ``ValueError`` unless every rank selected the same tokens and, when ``labels``
        are given, holds the same labels there (one all-reduce of at most eight integers).
        Different batches across the group would otherwise mismatch the collectives: a hang,
        or a silently wrong loss. The losses always pass the labels: besides the cross-entropy
        reading them, equal labels are what tells a tensor-parallel group from data-parallel
        ranks whose weights were taken for vocabulary shards (e.g. an FSDP2 parameter read
        outside its module's forward is a ``Shard(0)`` DTensor over the data-parallel mesh).
        The collective runs on the labels' device (NCCL cannot reduce CPU tensors)."""
        flat = valid.reshape(-1)
        positions = torch.arange(1, flat.numel() + 1, device=flat.device)
        stats = [flat.sum(), (positions * flat).sum()]
        if labels is not None:
            picked = torch.where(flat, labels.reshape(-1).to(flat.device, torch.int64), 0)
            stats += [picked.sum(), (positions * picked).sum()]
        stats = torch.stack(stats).to(torch.int64)
        both = torch.cat([stats, -stats])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[: len(stats)], -both[len(stats) :]):
            raise ValueError(
                "labels differ across the tensor-parallel ranks: every rank of the group must "
                "pass the same labels (the same batch), only the vocabulary is sharded. If the "
                "weights are FSDP2 parameters, read them inside their module's forward: "
                "outside it they are data-parallel shards, not vocabulary shards."
            )

    def log_softmax(self, x: Tensor, temperature: float, out: Tensor) -> Tensor:
        return self._load_shifted(x, temperature, out)

    def softmax(self, x: Tensor, temperature: float, out: Tensor) -> Tensor:
        return self._load_shifted(x, temperature, out).exp_()

    def all_sum(self, partial: Tensor) -> Tensor:
        return _all_reduce(partial, dist.ReduceOp.SUM, self.group)

    def vocab_range(self, local_size: int, device: torch.device) -> tuple[int, int]:
        """``(first vocabulary id of this rank's shard, whole vocabulary size)``: shards are
        contiguous, in rank order. One all-reduce of ``world_size`` integers on ``device``
        (the logits' device: NCCL cannot reduce CPU tensors)."""
        rank = dist.get_rank(self.group)
        sizes = torch.zeros(dist.get_world_size(self.group), dtype=torch.int64, device=device)
        sizes[rank] = local_size
        dist.all_reduce(sizes, group=self.group)
        return int(sizes[:rank].sum()), int(sizes.sum())


def _local_labels(labels: Tensor) -> Tensor:
    if not isinstance(labels, DTensor):
        return labels
    if all(isinstance(p, Replicate) for p in labels.placements):
        return labels.to_local()
    return labels.full_tensor()


def _check_same_layout(student: DTensor, teacher: DTensor) -> None:
    if student.device_mesh != teacher.device_mesh or student.placements != teacher.placements:
        raise ValueError(
            "student_logits and teacher_logits must be DTensors on the same mesh with the same "
            f"placements, got {student.placements} on {student.device_mesh} and "
            f"{teacher.placements} on {teacher.device_mesh}."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [*, V], got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}."
        )


def resolve_vocab_parallel(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    tp_group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor, Tensor, LocalVocabSoftmax]:
    """Pick the path for KDLoss and return ``(student, teacher, labels, vocab_softmax)``.

    * Both DTensors sharded on the vocabulary: their local shards and a
      :class:`VocabParallelSoftmax` over the inferred group (``tp_group`` is ignored). Other
      mesh dimensions must be replicated.
    * Both DTensors not sharded on the vocabulary (e.g. ``Replicate``): full tensors (autograd
      flows back through ``full_tensor``) and the single-process softmax.
    * Plain tensors with ``tp_group``: the tensors are each rank's vocabulary slice, in rank
      order, and the softmax is vocab-parallel over ``tp_group``.
    * Plain tensors without ``tp_group``: unchanged, single-process softmax.

    Raises:
        ValueError: when one of student/teacher is a DTensor and the other is not, or their
            meshes, placements or shapes differ, or a vocab-sharded DTensor has a
            non-replicated placement on another mesh dimension.
    """
    s_dt, t_dt = isinstance(student, DTensor), isinstance(teacher, DTensor)
    if s_dt != t_dt:
        kinds = ("DTensor" if s_dt else "plain tensor", "DTensor" if t_dt else "plain tensor")
        raise ValueError(
            "student_logits and teacher_logits must both be DTensors or both be plain tensors, "
            f"got a {kinds[0]} and a {kinds[1]}."
        )
    if not s_dt:
        if tp_group is not None and dist.get_rank(tp_group) < 0:
            raise ValueError("this rank is not a member of tp_group; pass its own group.")
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            return student, teacher, _local_labels(labels), VocabParallelSoftmax(tp_group)
        return student, teacher, _local_labels(labels), LocalVocabSoftmax()

    _check_same_layout(student, teacher)
    vocab_dims = [p for p in student.placements if _is_vocab_shard(p, student.ndim)]
    if len(vocab_dims) > 1:
        raise ValueError(
            "logits sharded on the vocabulary over more than one mesh dimension are not "
            f"supported, got placements {student.placements}; shard over one dimension."
        )
    group = find_vocab_tp_group(student)
    if group is None:
        return (
            student.full_tensor(),
            teacher.full_tensor(),
            _local_labels(labels),
            LocalVocabSoftmax(),
        )
    others = [p for p in student.placements if not _is_vocab_shard(p, student.ndim)]
    if any(not isinstance(p, Replicate) for p in others):
        raise ValueError(
            "vocab-sharded logits must be replicated on every other mesh dimension, got "
            f"placements {student.placements}; shard the batch with the data loader instead."
        )
    vocab = VocabParallelSoftmax(group) if dist.get_world_size(group) > 1 else LocalVocabSoftmax()
    return student.to_local(), teacher.to_local(), _local_labels(labels), vocab
