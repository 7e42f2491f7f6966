"""The live teacher: a frozen model run on every batch, compared with the student on logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.training.loss_terms import logits_of
from lightning_kd.training.teachers.base import MetaBuilder, TeacherBackend, run_model
from lightning_kd.training.vocabulary import reconcile_vocabularies

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule
    from lightning_kd.training.teacher import TeacherSource


def summed(mean: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """A per-token mean over the valid tokens of ``labels`` turned into their sum (detached)."""
    return mean.detach() * int((labels != ignore_index).sum())


class LiveTeacher(TeacherBackend):
    """A teacher model built from ``source`` and run under no-grad on every batch; the loss is
    the module's :class:`~lightning_kd.KDLoss` on both models' logits.

    Args:
        source: where the teacher comes from (its model or factory, and checkpoint).
    """

    #: What the loss compares (for :meth:`describe`).
    compares = "on its logits"

    def __init__(self, source: TeacherSource) -> None:
        self.source = source

    def setup(self, loss: KDLoss) -> None:
        self._loss = loss
        # The teacher's CE for evaluation: chunked like training, no fp32 copy of its logits.
        self._cross_entropy = KDLoss.from_options(loss, kd_ratio=0.0)

    def build(
        self, student: nn.Module, shared_vocab_size: int | None, on_meta: MetaBuilder
    ) -> nn.Module:
        source = self.source
        teacher = on_meta("teacher", source.model, source.checkpoint, source.checkpoint_prefix)
        with torch.random.fork_rng(devices=[]):  # the RNG stream is the same without a teacher
            if teacher is None:
                teacher = source.build()
        reconcile_vocabularies(student, teacher, shared_vocab_size)
        return teacher

    def run_teacher(self, module: DistillationModule, batch: Mapping[str, Tensor]) -> Any:
        """The teacher's forward: logits [B, S, V] (or an object with ``logits``)."""
        return run_model(module.teacher, "teacher", "forward", batch)

    def loss(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> KDLossOutput:
        return self._loss(
            logits_of(student_output), logits_of(teacher_output), batch["labels"],
            return_per_token=True,
        )  # fmt: skip

    def teacher_cross_entropy(
        self, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> Tensor | None:
        logits, labels = logits_of(teacher_output), batch["labels"]
        mean = self._cross_entropy(logits, logits, labels)
        return summed(mean, labels, self._cross_entropy.ignore_index)

    def settings(self) -> dict[str, Any]:
        return self.source.settings()

    def describe(self) -> str:
        checkpoint = self.source.checkpoint
        weights = f"weights from {checkpoint}" if checkpoint else "its own weights"
        return f"distilling from a live teacher ({weights}), {self.compares}"


__all__ = ["LiveTeacher", "summed"]
