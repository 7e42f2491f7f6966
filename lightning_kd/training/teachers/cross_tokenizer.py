"""A live teacher with its own tokenizer: run on the batch's teacher tokens, compared with the
student on aligned spans by a cross-tokenizer loss (``ULDLoss`` / ``HybridKDLoss``).

``DistillationModule`` picks this backend when its loss is a
:class:`~lightning_kd.losses.CrossTokenizerLoss`. Batches come from
:class:`~lightning_kd.data.cross_tokenizer_datamodule.CrossTokenizerDataModule`
(``teacher_input_ids``, ``teacher_labels``, ``xtok_spans`` besides the student's
``input_ids`` / ``labels``). The objective is ``kd_ratio · cross-tokenizer loss + (1 − kd_ratio) ·
student cross-entropy``; the cross-tokenizer term is a mean over the micro-batch's spans, the
cross-entropy a mean over its student tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_kd.losses.cross_tokenizer_loss import CrossTokenizerLoss
from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.token_spans import TokenSpans
from lightning_kd.training.loss_terms import logits_of
from lightning_kd.training.teachers.base import MetaBuilder, TeacherBackend, run_model

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule
    from lightning_kd.training.teacher import TeacherSource

#: What a batch must carry besides the student's ``input_ids`` and ``labels``.
TEACHER_KEYS = ("teacher_input_ids", "teacher_labels", "xtok_spans")


def spans_of_batch(xtok_spans: Tensor, student_seq_len: int, teacher_seq_len: int) -> TokenSpans:
    """:class:`TokenSpans` of a batch from its ``xtok_spans`` [B, K, 4] (rows of each example,
    -1 past its spans)."""
    b, k, _ = xtok_spans.shape
    keep = xtok_spans[..., 0] >= 0
    batch = torch.arange(b, device=xtok_spans.device).unsqueeze(1).expand(b, k)[keep]
    rows = xtok_spans[keep]
    return TokenSpans(
        batch * student_seq_len + rows[:, 0],
        rows[:, 1] - rows[:, 0],
        batch * teacher_seq_len + rows[:, 2],
        rows[:, 3] - rows[:, 2],
    )


class CrossTokenizerTeacher(TeacherBackend):
    """A teacher model with its own tokenizer and vocabulary (no vocabulary reconciliation).

    Args:
        source: where the teacher comes from (its model or factory, and checkpoint).
    """

    def __init__(self, source: TeacherSource) -> None:
        self.source = source

    def setup(self, loss: CrossTokenizerLoss) -> None:  # type: ignore[override]
        if not isinstance(loss, CrossTokenizerLoss):
            raise ValueError(
                f"CrossTokenizerTeacher needs a cross-tokenizer loss (ULDLoss, HybridKDLoss), "
                f"got {type(loss).__name__}."
            )
        self._loss = loss
        self._cross_entropy = KDLoss(
            ignore_index=loss.ignore_index, chunk_size=loss.chunk_size, kd_ratio=0.0,
            tp_group=loss.tp_group,
        )  # fmt: skip

    def build(
        self, student: nn.Module, shared_vocab_size: int | None, on_meta: MetaBuilder
    ) -> nn.Module:
        if shared_vocab_size is not None:
            raise ValueError(
                "shared_vocab_size has no use with a cross-tokenizer loss: the two vocabularies "
                "are related by the loss's vocabulary map, not by a shared prefix."
            )
        source = self.source
        teacher = on_meta("teacher", source.model, source.checkpoint, source.checkpoint_prefix)
        with torch.random.fork_rng(devices=[]):
            if teacher is None:
                teacher = source.build()
        return teacher

    @staticmethod
    def _check_batch(batch: Mapping[str, Tensor]) -> None:
        missing = [k for k in TEACHER_KEYS if k not in batch]
        if missing:
            raise ValueError(
                f"a cross-tokenizer loss needs batches with {', '.join(TEACHER_KEYS)} (as "
                f"CrossTokenizerDataModule makes); this batch lacks {', '.join(missing)}."
            )
        if "position_ids" in batch:
            raise ValueError(
                "packed sequences (position_ids) are not supported with a cross-tokenizer loss."
            )

    def run_teacher(self, module: DistillationModule, batch: Mapping[str, Tensor]) -> Any:
        """The teacher's forward on its own tokens: logits [B, S_t, V_t]."""
        self._check_batch(batch)
        return run_model(
            module.teacher, "teacher", "forward", {"input_ids": batch["teacher_input_ids"]}
        )

    def loss(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> KDLossOutput:
        self._check_batch(batch)
        student, teacher = logits_of(student_output), logits_of(teacher_output)
        labels, t_labels = batch["labels"], batch["teacher_labels"]
        spans = spans_of_batch(batch["xtok_spans"], labels.shape[-1], t_labels.shape[-1])
        loss = self._loss
        kd = loss.kd_ratio
        # Labels outside the spans may be ignore_index; the loss only reads span rows.
        s_lab, t_lab = labels.clamp_min(0), t_labels.clamp_min(0)
        with torch.set_grad_enabled(torch.is_grad_enabled() and kd > 0):
            xtok = loss(student, teacher, s_lab, t_lab, spans, return_per_span=True)
        with torch.set_grad_enabled(torch.is_grad_enabled() and kd < 1):
            ce = self._cross_entropy(student, student, labels, return_per_token=True)
        total = (
            kd * xtok.loss + (1.0 - kd) * ce.loss if 0 < kd < 1 else (xtok.loss if kd else ce.loss)
        )
        per_token = torch.zeros(labels.shape, dtype=xtok.per_span.dtype, device=labels.device)
        per_token.view(-1)[spans.student_start] = xtok.per_span
        return KDLossOutput(
            total, per_token, ce.valid_mask, ce.per_token_ce, xtok.loss.detach(), ce.ce_loss
        )

    def teacher_cross_entropy(
        self, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> Tensor | None:
        """None: the teacher's cross-entropy is per teacher token, not comparable per student
        token."""
        return None

    def settings(self) -> dict[str, Any]:
        return {**self.source.settings(), "cross_tokenizer": type(self._loss).__name__}

    def describe(self) -> str:
        checkpoint = self.source.checkpoint
        weights = f"weights from {checkpoint}" if checkpoint else "its own weights"
        return (
            f"distilling from a live teacher with its own tokenizer ({weights}), "
            f"{type(self._loss).__name__} on aligned spans"
        )


def match_loss(backend: TeacherBackend, loss: Any) -> TeacherBackend:
    """The backend to use with ``loss``: a live teacher becomes a :class:`CrossTokenizerTeacher`
    when the loss is a cross-tokenizer loss; the other kinds cannot serve one.

    Raises:
        ValueError: for a cross-tokenizer loss with a teacher cache, the fused head or another
            backend, and for a cross-tokenizer backend with a loss that is not one.
    """
    from lightning_kd.training.teachers.live import LiveTeacher

    cross = isinstance(loss, CrossTokenizerLoss)
    if isinstance(backend, CrossTokenizerTeacher) or not cross:
        if isinstance(backend, CrossTokenizerTeacher) and not cross:
            raise ValueError(
                "CrossTokenizerTeacher needs a cross-tokenizer loss (ULDLoss, HybridKDLoss), got "
                f"{type(loss).__name__}."
            )
        return backend
    if type(backend) is LiveTeacher:
        return CrossTokenizerTeacher(backend.source)
    if backend.source is None:
        raise ValueError(
            f"{type(loss).__name__} distils from a live teacher with its own tokenizer; a teacher "
            "cache (teacher_cache=) holds distributions over the student's tokens and cannot "
            "serve it. Pass teacher= instead."
        )
    raise ValueError(
        f"{type(loss).__name__} needs the teacher's logits on its own tokens; the "
        f"{type(backend).__name__} backend (fused_head=True, or a custom backend) does not give "
        "them. Use teacher= with fused_head=False."
    )


__all__ = ["TEACHER_KEYS", "CrossTokenizerTeacher", "match_loss", "spans_of_batch"]
