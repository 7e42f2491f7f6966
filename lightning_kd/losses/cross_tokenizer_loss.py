"""Cross-tokenizer distillation losses: ``ULDLoss`` and the token-aligned ``HybridKDLoss``.

A teacher and a student with different tokenizers give logits over different vocabularies, one
row per token of their own tokenization. Both losses take the two sets of logits, the tokens each
row predicts (``labels``) and the aligned spans between the rows
(:class:`~lightning_kd.losses.token_spans.TokenSpans`, built from
:mod:`lightning_kd.data.alignment`), and sum one value per span over the spans, divided by the
number of spans (or by ``num_batch_labels``):

- :class:`ULDLoss`: Universal Logit Distillation on every span (:mod:`~lightning_kd.losses.uld`):
  the L1 distance between the sorted, span-merged probability vectors, padded to the larger
  vocabulary (Boizard et al. 2024; TRL's ``ULDLoss``).
- :class:`HybridKDLoss`: where a span is one token on both sides and the two tokens have the same
  string, the exact ``T² · D(P, Q)`` of a ``KDLoss`` divergence over the tokens the vocabularies
  share (both softmaxes renormalised over them); ULD on every other span. With one tokenizer on
  both sides every span is exact and the loss equals ``KDLoss`` with the same divergence, values
  and gradients.

Differences from TRL's GOLD (``uld_use_hybrid_loss``), on purpose:

- GOLD splits *every* aligned position into matched and unmatched vocabulary entries: a JSD over
  the matched entries' (unnormalised) probabilities weighted by the matched share of the teacher
  vocabulary, plus ULD on the unmatched entries' sorted probabilities. Ours chooses per span:
  exact where the two sides predict the same token string (any ``KDLoss`` divergence, over a
  proper distribution on the shared tokens), ULD over the whole vectors elsewhere. So identical
  tokenizers reduce to ``KDLoss`` exactly, which GOLD's weighting does not.
- GOLD averages per sequence, then over the batch; ours divides the sum over all spans of the
  batch (or a gradient-accumulation window) by their number, like every loss of this package.
- GOLD clamps chained token probabilities at 1e-8; ours chains log-probabilities (no clamp).
- One temperature for both sides (GOLD has one per side); ULD values are not scaled by ``T²``
  (as in GOLD), the exact divergence is (as in ``KDLoss``).

Memory and tensor parallelism: see :mod:`~lightning_kd.losses.cross_tokenizer_engine`. The loss
imports nothing from Lightning.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate

from lightning_kd.checks import check_bool, check_int, check_unit_interval
from lightning_kd.losses.cross_tokenizer_engine import XTokSpec, cross_tokenizer_pass, exact_spans
from lightning_kd.losses.divergences import Divergence, resolve_divergence
from lightning_kd.losses.input_checks import check_normaliser
from lightning_kd.losses.token_spans import TokenSpans, check_spans
from lightning_kd.losses.vocab_map import VocabMap
from lightning_kd.losses.vocab_parallel import find_vocab_tp_group


class CrossTokenizerOutput(NamedTuple):
    """What the cross-tokenizer losses return with ``return_per_span=True``.

    Attributes:
        loss: 0-dim, the value the plain call returns (connected to the student).
        per_span: [K] detached value of each span (``T² · D`` for exact spans, ``uld_weight ·
            ULD`` for the others).
        exact: [K] bool, the spans computed with the exact divergence.
    """

    loss: Tensor
    per_span: Tensor
    exact: Tensor


def _local(x: Tensor, name: str) -> tuple[Tensor, dist.ProcessGroup | None]:
    if not isinstance(x, DTensor):
        return x, None
    group = find_vocab_tp_group(x)
    if group is None:
        return x.full_tensor(), None
    shards = [p for p in x.placements if p.is_shard()]
    if len(shards) != 1 or any(
        not isinstance(p, Replicate) for p in x.placements if not p.is_shard()
    ):
        raise ValueError(
            f"{name} must be sharded on the vocabulary over one mesh dimension and replicated "
            f"on the others, got placements {x.placements}."
        )
    return x.to_local(), group


def _labels(x: Tensor) -> Tensor:
    if isinstance(x, DTensor):
        return x.full_tensor()
    return x


class CrossTokenizerOptions(NamedTuple):
    """A cross-tokenizer loss's options as one value (``loss.options``; what a checkpoint
    records)."""

    ignore_index: int
    temperature: float
    fp32_upcast: bool
    tp_group: dist.ProcessGroup | None
    chunk_size: int
    divergence: Divergence | None
    kd_ratio: float
    uld_weight: float


class CrossTokenizerLoss(nn.Module):
    """The base of :class:`ULDLoss` and :class:`HybridKDLoss`: options, checks, the pass.

    Args:
        temperature: softmax temperature ``T`` of both sides (finite, > 0).
        chunk_size: at most this many rows per side are processed at once (0: all at once);
            memory is then the student gradient plus O(chunk_size × V) per side.
        fp32_upcast: compute in fp32 for half-precision logits.
        tp_group: for plain tensors that are each rank's vocabulary slice (in rank order);
            DTensor logits sharded on the last dim carry their own group.
        uld_weight: weight of each ULD span's value (>= 0).
        kd_ratio: not used by the loss itself: ``DistillationModule`` trains on
            ``kd_ratio · this loss + (1 − kd_ratio) · the student's cross-entropy`` (in [0, 1];
            assignable, e.g. annealed).
        ignore_index: the label of the student's rows that are not targets (for that
            cross-entropy and the token counts; the spans never hold such rows).

    Raises:
        ValueError: for a non-positive or non-finite temperature, a negative chunk_size, a
            negative or non-finite uld_weight, or a kd_ratio outside [0, 1].
    """

    #: Whether the loss aligns two vocabularies (the training module checks it).
    cross_tokenizer = True

    def __init__(
        self,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        fp32_upcast: bool = True,
        tp_group: dist.ProcessGroup | None = None,
        uld_weight: float = 1.0,
        kd_ratio: float = 1.0,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {temperature!r}.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an integer >= 0, got {chunk_size!r}.")
        if isinstance(uld_weight, bool) or not isinstance(uld_weight, (int, float)):
            raise ValueError(f"uld_weight must be a number, got {uld_weight!r}.")
        if not (math.isfinite(uld_weight) and uld_weight >= 0):
            raise ValueError(f"uld_weight must be finite and >= 0, got {uld_weight}.")
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.fp32_upcast = check_bool("fp32_upcast", fp32_upcast)
        self.tp_group = tp_group
        self.uld_weight = float(uld_weight)
        self.kd_ratio = kd_ratio
        self.ignore_index = check_int("ignore_index", ignore_index)

    @property
    def kd_ratio(self) -> float:
        """Weight of this loss against the student's cross-entropy in ``DistillationModule``."""
        return self._kd_ratio

    @kd_ratio.setter
    def kd_ratio(self, value: float) -> None:
        self._kd_ratio = check_unit_interval("kd_ratio", value)

    @property
    def options(self) -> CrossTokenizerOptions:
        """The options as one value."""
        return CrossTokenizerOptions(
            self.ignore_index, self.temperature, self.fp32_upcast, self.tp_group,
            self.chunk_size, self.divergence, self.kd_ratio, self.uld_weight,
        )  # fmt: skip

    divergence: Divergence | None = None
    vocab_map: VocabMap | None = None

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_labels: Tensor,
        teacher_labels: Tensor,
        spans: TokenSpans,
        num_batch_labels: int | float | Tensor | None = None,
        *,
        return_per_span: bool = False,
    ) -> Tensor | CrossTokenizerOutput:
        """Compute the loss.

        Args:
            student_logits: [*, V_s] student logits, row ``r`` predicting ``student_labels[r]``;
                or a DTensor sharded on the vocabulary (tensor parallel).
            teacher_logits: [*, V_t] teacher logits (its own rows and vocabulary); same kind.
            student_labels: [*] (the student logits' leading shape) integer tokens; inside a
                span they must be student vocabulary ids.
            teacher_labels: [*] the teacher's (teacher logits' leading shape).
            spans: the aligned spans (rows of the flattened leading dims).
            num_batch_labels: the denominator (> 0) instead of the number of spans, e.g. the
                spans of a whole gradient-accumulation window.
            return_per_span: also return the per-span values (see
                :class:`CrossTokenizerOutput`).

        Returns:
            A 0-dim tensor in the compute dtype; with no span a finite 0 still connected to the
            student (zero gradient).

        Raises:
            ValueError: for non-floating logits, labels of the wrong shape or dtype, spans
                outside the rows or overlapping, labels in a span that are not vocabulary ids,
                mixed DTensor and plain inputs, or a ``num_batch_labels`` <= 0.
        """
        check_bool("return_per_span", return_per_span)
        if isinstance(student_logits, DTensor) != isinstance(teacher_logits, DTensor):
            raise ValueError(
                "student_logits and teacher_logits must both be DTensors or both plain tensors."
            )
        student, s_group = _local(student_logits, "student_logits")
        teacher, t_group = _local(teacher_logits, "teacher_logits")
        if (s_group is None) != (t_group is None):
            raise ValueError(
                "student_logits and teacher_logits must both be sharded on the vocabulary, or "
                "neither."
            )
        group = s_group if s_group is not None else self.tp_group
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        s_labels, t_labels = _labels(student_labels), _labels(teacher_labels)
        self._check_inputs(student, teacher, s_labels, t_labels)
        s_labels = s_labels.reshape(-1).to(student.device, torch.int64)
        t_labels = t_labels.reshape(-1).to(student.device, torch.int64)
        spans = spans.to(student.device) if isinstance(spans, TokenSpans) else spans
        check_spans(spans, s_labels.numel(), t_labels.numel())
        vocab_s = student.shape[-1] if group is None else _global_size(student, group)
        vocab_t = teacher.shape[-1] if group is None else _global_size(teacher, group)
        _check_span_labels("student", s_labels, spans.student_start, spans.student_len, vocab_s)
        _check_span_labels("teacher", t_labels, spans.teacher_start, spans.teacher_len, vocab_t)
        if self.vocab_map is not None and (
            self.vocab_map.student_vocab_size != vocab_s
            or self.vocab_map.teacher_vocab_size != vocab_t
        ):
            raise ValueError(
                f"vocab_map is for vocabularies of {self.vocab_map.student_vocab_size} (student) "
                f"and {self.vocab_map.teacher_vocab_size} (teacher) tokens, but the logits have "
                f"{vocab_s} and {vocab_t}."
            )
        if num_batch_labels is None:
            normaliser = float(max(spans.num_spans, 1))
        else:
            normaliser = check_normaliser(num_batch_labels)
        dtype = torch.promote_types(student.dtype, teacher.dtype)
        if self.fp32_upcast:
            dtype = torch.promote_types(dtype, torch.float32)
        exact = exact_spans(spans, s_labels, t_labels, self.vocab_map)
        spec = XTokSpec(
            self.divergence, self.vocab_map, self.temperature, self.uld_weight, normaliser,
            self.chunk_size, dtype, group,
        )  # fmt: skip
        loss, per_span = cross_tokenizer_pass(
            student, teacher, s_labels, t_labels, spans, exact, spec
        )
        if return_per_span:
            return CrossTokenizerOutput(loss, per_span, exact)
        return loss

    @staticmethod
    def _check_inputs(student: Tensor, teacher: Tensor, s_labels: Tensor, t_labels: Tensor) -> None:
        for name, x in (("student_logits", student), ("teacher_logits", teacher)):
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
                raise ValueError(f"{name} must be a floating-point tensor of shape [*, V].")
        if student.device != teacher.device:
            raise ValueError(
                f"student_logits and teacher_logits must be on one device, got {student.device} "
                f"and {teacher.device}."
            )
        for name, labels, logits in (
            ("student_labels", s_labels, student),
            ("teacher_labels", t_labels, teacher),
        ):
            if (
                not isinstance(labels, Tensor)
                or labels.is_floating_point()
                or labels.dtype == torch.bool
            ):
                raise ValueError(f"{name} must be an integer tensor.")
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(
                    f"{name} must have its logits' leading shape {tuple(logits.shape[:-1])}, got "
                    f"{tuple(labels.shape)}."
                )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, vocab_map={self.vocab_map!r}, "
            f"temperature={self.temperature}, uld_weight={self.uld_weight}, "
            f"chunk_size={self.chunk_size}, fp32_upcast={self.fp32_upcast}"
        )


def _global_size(x: Tensor, group: dist.ProcessGroup) -> int:
    size = torch.tensor([x.shape[-1]], dtype=torch.int64)
    dist.all_reduce(size, group=group)
    return int(size)


def _check_span_labels(
    side: str, labels: Tensor, start: Tensor, length: Tensor, vocab: int
) -> None:
    if start.numel() == 0:
        return
    rows = torch.repeat_interleave(start, length) + (
        torch.arange(int(length.sum()), device=start.device)
        - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
    )
    picked = labels[rows]
    if bool(((picked < 0) | (picked >= vocab)).any()):
        raise ValueError(
            f"every {side} row inside a span must predict a vocabulary id in [0, {vocab}); "
            f"a span holds an ignored or out-of-range label."
        )


class ULDLoss(CrossTokenizerLoss):
    """Universal Logit Distillation on every aligned span (see the module docstring).

    Per span: ``uld_weight · Σ_i |sort↓(P̃)_i − sort↓(Q̃)_i|`` with ``P̃``, ``Q̃`` the teacher's and
    the student's span-merged probabilities at temperature ``T``, the shorter padded with zeros.
    """


class HybridKDLoss(CrossTokenizerLoss):
    """Exact divergence where both sides predict the same single token, ULD elsewhere.

    Args:
        vocab_map: the tokens both vocabularies share (:class:`VocabMap`; ``VocabMap.identity(V)``
            for one tokenizer).
        divergence: the exact spans' divergence, a ``KDLoss`` name or ``Divergence`` object.
        temperature, chunk_size, fp32_upcast, tp_group, uld_weight, kd_ratio, ignore_index: as
            for :class:`CrossTokenizerLoss`.

    Raises:
        ValueError: as :class:`CrossTokenizerLoss`, and for a ``vocab_map`` that is not a
            :class:`VocabMap` or shares no token, or an unknown divergence.
    """

    def __init__(
        self,
        vocab_map: VocabMap,
        divergence: str | Divergence = "forward_kl",
        temperature: float = 1.0,
        chunk_size: int = 1024,
        fp32_upcast: bool = True,
        tp_group: dist.ProcessGroup | None = None,
        uld_weight: float = 1.0,
        kd_ratio: float = 1.0,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(
            temperature, chunk_size, fp32_upcast, tp_group, uld_weight, kd_ratio, ignore_index
        )
        if not isinstance(vocab_map, VocabMap):
            raise ValueError(f"vocab_map must be a VocabMap, got {type(vocab_map).__name__}.")
        if vocab_map.num_shared == 0:
            raise ValueError("vocab_map shares no token; use ULDLoss for disjoint vocabularies.")
        self.vocab_map = vocab_map
        self.divergence = resolve_divergence(divergence)
