"""``LinearKDLoss``: ``KDLoss`` with the lm_heads fused in, so no ``[N, V]`` logits ever exist.

It takes the last hidden states and the output-head weights (and biases) of the student and
the teacher instead of their logits, and returns exactly what ``KDLoss`` returns for
``hidden @ weight.T + bias``, in value and in the gradients of the student's hidden states,
weight and bias. Each chunk's logits are computed from its hidden rows inside the chunk loop
and the gradients are written during the forward pass (see
:mod:`lightning_kd.losses.linear_engine`), so the memory is O(chunk_size × V) plus gradients
shaped like the inputs, instead of several ``[N, V]`` matrices. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_kd.losses.divergences import Divergence
from lightning_kd.losses.engine import PassSpec
from lightning_kd.losses.input_checks import check_label_range, check_normaliser, local_labels
from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.linear_engine import Head, linear_distill_over_rows, matmul_dtype
from lightning_kd.losses.loss_base import KDLossBase
from lightning_kd.losses.options import KDOptions
from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax
from lightning_kd.losses.vocab_softmax import LocalVocabSoftmax


class LinearKDLoss(KDLossBase):
    """``KDLoss`` on ``hidden @ weight.T + bias`` without materialising the logits.

    ``LinearKDLoss(**options)(student_hidden, student_weight, teacher_hidden, teacher_weight,
    labels, student_bias, teacher_bias)`` equals ``KDLoss(**options)(student_hidden @
    student_weight.T + student_bias, teacher_hidden @ teacher_weight.T + teacher_bias,
    labels)``, value and gradients, for every divergence and ``kd_ratio`` (see
    :class:`~lightning_kd.KDLoss` for the loss itself). The chunk logits are computed inside the
    chunk loop and the gradients of ``student_hidden``, ``student_weight`` and
    ``student_bias`` are computed analytically during the forward pass:
    ``grad_hidden[rows] = G @ W``, ``grad_W += Gᵀ @ hidden[rows]``, ``grad_b += Σ_rows G``
    with ``G`` the chunk's ``d(loss)/d(logits)``; the backward pass only scales them. Peak
    memory is a few ``[chunk_size, V]`` buffers (the student's and the teacher's chunk logits,
    the divergence's workspaces and ``G``) plus the gradients, never an ``[N, V]`` tensor. Only
    valid tokens are computed; chunks hold up to ``chunk_size`` of them.

    Dtypes: each model's chunk logits are computed in ``promote(hidden.dtype, weight.dtype)``,
    or in the autocast dtype when autocast is enabled (what ``F.linear`` does); softmaxes,
    and ``G`` are in the compute dtype (as in ``KDLoss``: fp32 for half-precision logits with
    ``fp32_upcast``), the weight/bias gradient sums over tokens in fp32 at least; each gradient
    is returned in its input's dtype.

    The teacher's tensors are used detached: they never receive a gradient, even if they
    require one.

    Tensor parallelism (a column-parallel lm_head): pass the weights (and biases) as DTensors
    sharded on the vocabulary, ``Shard(0)`` of ``[V, d]`` (the group is taken from their mesh;
    other mesh dimensions must be ``Replicate``), or as plain local vocabulary slices with
    ``tp_group`` (in rank order). The hidden states and labels must be the same on every rank
    of the group (plain tensors, or ``Replicate`` DTensors). The softmaxes communicate
    O(tokens) values, as in ``KDLoss``; the hidden-state gradient (a sum over the vocabulary)
    is all-reduced once per call at the end of the forward pass, ``n_valid × d_s`` values in
    fp32 (fp64 for fp64 inputs): ``4 · d_s`` bytes per valid token; each rank's weight and bias
    gradient is its own slice and needs no communication (a DTensor weight gets a DTensor
    gradient with its placements). Gradients reach the weight through autograd, so a leaf
    parameter, a view of one and a DTensor parameter (e.g. unsharded by FSDP2 in its module's
    forward) all work.

    Args:
        ignore_index, temperature, fp32_upcast, tp_group, chunk_size, divergence, kd_ratio:
            as for :class:`~lightning_kd.KDLoss`, with the same checks. ``chunk_size`` here
            counts valid tokens per chunk (0: all at once); the default is 1024, since bounding
            the memory is the point of this loss.

    Raises:
        ValueError: as ``KDLoss`` for the options.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        temperature: float = 1.0,
        fp32_upcast: bool = True,
        tp_group: dist.ProcessGroup | None = None,
        chunk_size: int = 1024,
        *,
        divergence: str | Divergence = "forward_kl",
        kd_ratio: float = 1.0,
    ) -> None:
        super().__init__(
            ignore_index, temperature, fp32_upcast, tp_group, chunk_size,
            divergence=divergence, kd_ratio=kd_ratio,
        )  # fmt: skip

    @classmethod
    def from_kd_loss(cls, loss: KDLoss, chunk_size: int | None = None) -> LinearKDLoss:
        """A ``LinearKDLoss`` with a copy of the options of ``loss`` (``chunk_size`` overrides
        its chunk size; its 0, unchunked, becomes 1024 unless given). To follow ``loss``'s
        ``kd_ratio`` when it is assigned later, use ``from_options(loss, chunk_size=...)``.

        Raises:
            ValueError: when ``loss`` is not a ``KDLoss``.
        """
        if not isinstance(loss, KDLoss):
            raise ValueError(f"loss must be a KDLoss, got {type(loss).__name__}.")
        return cls.from_options(loss.options, chunk_size=fused_chunk_size(loss.options, chunk_size))

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        labels: Tensor,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_batch_labels: int | float | Tensor | None = None,
        *,
        return_per_token: bool = False,
    ) -> Tensor | KDLossOutput:
        """Compute the loss.

        Args:
            student_hidden: [*, d_s] floating hidden states (plain, or a ``Replicate``
                DTensor); receives a gradient.
            student_weight: [V, d_s] head weight (a vocab-sharded DTensor, or this rank's
                slice with ``tp_group``); receives a gradient.
            teacher_hidden: [*, d_t] teacher hidden states, same leading shape; no gradient.
                May be None (with ``teacher_weight``) when only the CE is computed
                (``kd_ratio=0`` and not ``return_per_token``).
            teacher_weight: [V, d_t] teacher head weight, same vocabulary and same kind as the
                student's; no gradient.
            labels: [*] integer labels (plain, or a replicated DTensor).
            student_bias: [V] student head bias (same kind as the weight), or None.
            teacher_bias: [V] teacher head bias, or None.
            num_batch_labels: as for ``KDLoss``.
            return_per_token: as for ``KDLoss``.

        Returns:
            A 0-dim tensor in the compute dtype, or a
            :class:`~lightning_kd.losses.kd_loss.KDLossOutput` when ``return_per_token``.
            With no valid token the loss is a finite 0 connected to the student (zero
            gradients).

        Raises:
            ValueError: on mismatched shapes, kinds, devices or meshes, non-floating hidden
                states or weights, non-integer labels, a non-positive ``num_batch_labels``,
                missing teacher tensors when the divergence is needed, or (with
                ``kd_ratio < 1``) a valid label outside ``[0, V)``; before any heavy work.
        """
        with_ce, with_div = self.mixed_terms(return_per_token)
        if (teacher_hidden is None) != (teacher_weight is None):
            raise ValueError("pass both teacher_hidden and teacher_weight, or neither.")
        if teacher_hidden is None:
            if with_div:
                raise ValueError(
                    "teacher_hidden and teacher_weight are needed for the divergence; they may "
                    "be None only with kd_ratio=0 and return_per_token=False."
                )
            if teacher_bias is not None:
                raise ValueError("teacher_bias was given without teacher_weight.")
        student, teacher, labels, vocab, group = _resolve(
            Head(student_hidden, student_weight, student_bias),
            None if teacher_hidden is None else Head(teacher_hidden, teacher_weight, teacher_bias),
            labels,
            self.tp_group,
        )
        normaliser = None if num_batch_labels is None else check_normaliser(num_batch_labels)
        valid, normaliser = self.valid_tokens(labels, vocab, normaliser)
        heads = [student] if teacher is None else [student, teacher]
        compute_dtype = self.compute_dtype(*(matmul_dtype(h.hidden, h.weight) for h in heads))
        spec = PassSpec(
            self.divergence if with_div else None,
            self.temperature,
            normaliser,
            self.chunk_size,
            compute_dtype,
            kd_ratio=self.kd_ratio,
            with_ce=with_ce,
        )
        device = student.hidden.device
        targets = None
        if with_ce:
            targets = labels.reshape(-1).to(device, torch.int64)
            offset, vocab_size = vocab.vocab_range(student.weight.shape[0], device)
            spec = spec._replace(label_offset=offset, vocab_size=vocab_size)
            if self.kd_ratio < 1.0:
                check_label_range(targets, valid, vocab_size)
        out = linear_distill_over_rows(student, teacher, valid, vocab, spec, targets, group)
        return self.output(out, valid, return_per_token)


def fused_chunk_size(options: KDOptions, chunk_size: int | None = None) -> int:
    """The chunk size of the fused form of a loss with ``options``: ``chunk_size`` when given,
    else the loss's, with 0 (unchunked) replaced by 1024 (bounding the memory is the point)."""
    if chunk_size is not None:
        return chunk_size
    return options.chunk_size or 1024


def _is_vocab_row_shard(placement: object) -> bool:
    return isinstance(placement, Shard) and placement.dim in (0, -2)


def _check_tensor(name: str, x: object, ndim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}.")
    if ndim is None and x.ndim < 1:
        raise ValueError(f"{name} must have shape [*, d], got a 0-dim tensor.")


def _check_head(who: str, head: Head, lead: tuple[int, ...] | None) -> None:
    """Shapes and dtypes of one model's hidden states, weight and bias (global shapes)."""
    _check_tensor(f"{who}_hidden", head.hidden)
    _check_tensor(f"{who}_weight", head.weight, ndim=2)
    vocab, dim = head.weight.shape
    if head.hidden.shape[-1] != dim:
        raise ValueError(
            f"{who}_hidden's last dimension ({head.hidden.shape[-1]}) must equal "
            f"{who}_weight's dimension 1 (shape [V, d] = {tuple(head.weight.shape)})."
        )
    if lead is not None and tuple(head.hidden.shape[:-1]) != lead:
        raise ValueError(
            f"{who}_hidden must have the labels' shape {lead} before its last dimension, got "
            f"{tuple(head.hidden.shape)}."
        )
    if head.bias is not None:
        _check_tensor(f"{who}_bias", head.bias, ndim=1)
        if head.bias.shape[0] != vocab:
            raise ValueError(
                f"{who}_bias must have shape [V] = [{vocab}] like {who}_weight, got "
                f"{tuple(head.bias.shape)}."
            )
    devices = {x.device for x in head if x is not None}
    if len(devices) > 1:
        raise ValueError(
            f"{who}'s hidden states, weight and bias must share a device, got {devices}."
        )


def _check_inputs(student: Head, teacher: Head | None, labels: Tensor) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be an integer tensor, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}.")
    lead = tuple(labels.shape)
    _check_head("student", student, lead)
    if teacher is None:
        return
    _check_head("teacher", teacher, lead)
    if student.weight.shape[0] != teacher.weight.shape[0]:
        raise ValueError(
            "student_weight and teacher_weight must have the same vocabulary size (dim 0), got "
            f"{student.weight.shape[0]} and {teacher.weight.shape[0]}."
        )
    if student.hidden.device != teacher.hidden.device:
        raise ValueError(
            "the student's and teacher's tensors must be on the same device, got "
            f"{student.hidden.device} and {teacher.hidden.device}."
        )


def _local_hidden(name: str, hidden: Tensor) -> Tensor:
    if not isinstance(hidden, DTensor):
        return hidden
    if not all(isinstance(p, Replicate) for p in hidden.placements):
        raise ValueError(
            f"{name} must be replicated (a plain tensor or a Replicate DTensor), got placements "
            f"{hidden.placements}; redistribute it to Replicate first."
        )
    return hidden.to_local()


def _weight_group(weight: DTensor, name: str) -> dist.ProcessGroup | None:
    """The group of the mesh dimension sharding ``weight`` on the vocabulary (dim 0), or None
    when it is replicated; ValueError for other layouts."""
    shards = [i for i, p in enumerate(weight.placements) if _is_vocab_row_shard(p)]
    others = [p for p in weight.placements if not _is_vocab_row_shard(p)]
    if len(shards) > 1 or any(not isinstance(p, Replicate) for p in others):
        raise ValueError(
            f"{name} must be sharded on the vocabulary (Shard(0) of [V, d], a column-parallel "
            f"lm_head) over one mesh dimension and replicated on the others, got placements "
            f"{weight.placements}."
        )
    return weight.device_mesh.get_group(shards[0]) if shards else None


def _resolve(
    student: Head, teacher: Head | None, labels: Tensor, tp_group: dist.ProcessGroup | None
) -> tuple[Head, Head | None, Tensor, LocalVocabSoftmax, dist.ProcessGroup | None]:
    """Validate, pick the vocabulary softmax and return local tensors:
    ``(student, teacher, labels, vocab_softmax, group for the hidden gradient)``."""
    _check_inputs(student, teacher, labels)
    weights = [("student_weight", student.weight)]
    if teacher is not None:
        weights.append(("teacher_weight", teacher.weight))
    biases = [("student_bias", student.bias, student.weight)]
    if teacher is not None:
        biases.append(("teacher_bias", teacher.bias, teacher.weight))
    is_dt = [isinstance(w, DTensor) for _, w in weights]
    if len(set(is_dt)) > 1:
        raise ValueError(
            "student_weight and teacher_weight must both be DTensors or both be plain tensors."
        )
    for name, bias, weight in biases:
        if bias is not None and isinstance(bias, DTensor) != isinstance(weight, DTensor):
            raise ValueError(f"{name} must be a DTensor exactly when its weight is one.")

    group = None
    if is_dt[0]:
        ref = student.weight
        group = _weight_group(ref, "student_weight")
        for name, w in weights[1:]:
            if w.device_mesh != ref.device_mesh or w.placements != ref.placements:
                raise ValueError(
                    f"{name} must be on student_weight's mesh with its placements, got "
                    f"{w.placements} on {w.device_mesh} and {ref.placements} on {ref.device_mesh}."
                )
        for name, bias, weight in biases:
            if bias is not None and (
                bias.device_mesh != weight.device_mesh or bias.placements != weight.placements
            ):
                raise ValueError(
                    f"{name} must be a DTensor on its weight's mesh with the same placements "
                    f"(Shard(0) on the vocabulary), got {bias.placements}."
                )
    elif tp_group is not None:
        if dist.get_rank(tp_group) < 0:
            raise ValueError("this rank is not a member of tp_group; pass its own group.")
        group = tp_group
    if group is not None and dist.get_world_size(group) == 1:
        group = None

    def local(head: Head, who: str) -> Head:
        def to_local(x: Tensor | None) -> Tensor | None:
            return x.to_local() if isinstance(x, DTensor) else x

        return Head(
            _local_hidden(f"{who}_hidden", head.hidden), to_local(head.weight), to_local(head.bias)
        )

    student = local(student, "student")
    teacher = local(teacher, "teacher") if teacher is not None else None
    if teacher is not None and student.weight.shape[0] != teacher.weight.shape[0]:
        raise ValueError(
            "student_weight and teacher_weight must hold the same vocabulary rows on each rank, "
            f"got {student.weight.shape[0]} and {teacher.weight.shape[0]} local rows."
        )
    vocab = VocabParallelSoftmax(group) if group is not None else LocalVocabSoftmax()
    return student, teacher, local_labels(labels), vocab, group
