"""The offline teacher: a teacher cache written by ``lightning-kd cache-teacher``, no model.

Exact caches (``top_k=0``) go through the module's own :class:`~lightning_kd.KDLoss` with
``T · log P`` as the teacher's logits; top-k caches through
:class:`~lightning_kd.losses.TopKKDLoss` with the loss's options (the top-k tokens plus one
bucket for the rest of the vocabulary, whose log-mass the cache stores), any divergence.
Opening, checking and reading the cache is :mod:`lightning_kd.training.cached_teacher`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.topk_kd_loss import TopKKDLoss
from lightning_kd.models.contract import lm_head_width
from lightning_kd.training.cached_teacher import (
    SPLIT_OF_STAGE,
    CachedTeacherSource,
    cached_teacher_ce,
)
from lightning_kd.training.loss_terms import logits_of
from lightning_kd.training.teachers.base import TeacherBackend

if TYPE_CHECKING:
    from lightning_kd.teacher_cache import CachedTeacher
    from lightning_kd.training.distillation import DistillationModule


class CacheTeacher(TeacherBackend):
    """Distil from a teacher cache: no teacher is built; batches must carry ``index``.

    The cache is checked against the run (vocabulary, temperature, tokenizer, the data of each
    split) on the first batch of each split it is read for.

    Args:
        directory: the cache written by ``lightning-kd cache-teacher``.

    Raises:
        ValueError: for a missing or malformed cache.
    """

    def __init__(self, directory: str) -> None:
        self.reader = CachedTeacherSource(directory)  # fails now on a missing or bad cache
        self._checked_splits: set[str] = set()

    def setup(self, loss: KDLoss) -> None:
        """Raises: ValueError for a format version 1 top-k cache with another divergence than
        forward KL (it stores no tail log-mass)."""
        self.reader.check_loss(loss)
        self._loss = loss
        self._top_k = (
            TopKKDLoss.from_options(loss) if self.reader.cache.metadata.top_k > 0 else None
        )

    def _split(self, module: DistillationModule) -> str:
        try:
            stage = module.trainer.state.stage
        except RuntimeError:  # not attached to a trainer: read the training split
            stage = None
        return SPLIT_OF_STAGE.get(stage.value if stage is not None else "train", "train")

    def run_teacher(self, module: DistillationModule, batch: Mapping[str, Tensor]) -> CachedTeacher:
        """The cached rows of the batch (by its ``index``), the cache checked against the run
        on the first batch of each split."""
        split = self._split(module)
        if split not in self._checked_splits:
            width = lm_head_width(module.student)
            self.reader.check(module.trainer.datamodule, self._loss, width, (split,))
            self._checked_splits.add(split)
        return self.reader.read(batch, split, self._loss.ignore_index)

    def loss(
        self, student_output: Any, teacher_output: CachedTeacher, batch: Mapping[str, Tensor]
    ) -> KDLossOutput:
        student_logits, labels = logits_of(student_output), batch["labels"]
        if self._top_k is not None:
            return self._top_k(
                student_logits, teacher_output.ids, teacher_output.logprobs, labels,
                return_per_token=True, teacher_tail_logprob=teacher_output.tail_logprob,
            )  # fmt: skip
        # Exact: softmax(T · log P / T) = P, vocabulary-sharded like the student's under TP.
        teacher_logits = teacher_output.logprobs * self._loss.temperature
        if isinstance(student_logits, DTensor):
            teacher_logits = distribute_tensor(
                teacher_logits.to(student_logits.device),
                student_logits.device_mesh,
                student_logits.placements,
                src_data_rank=None,  # every rank holds the full rows: no communication
            )
        return self._loss(student_logits, teacher_logits, labels, return_per_token=True)

    def teacher_cross_entropy(
        self, teacher_output: CachedTeacher, batch: Mapping[str, Tensor]
    ) -> Tensor | None:
        """From an exact cache; None from a top-k one (the labels' probabilities are unknown)."""
        options = self._loss.options
        return cached_teacher_ce(
            teacher_output, batch["labels"], options.ignore_index, options.temperature
        )

    def settings(self) -> dict[str, Any]:
        return {
            "teacher_cache": self.reader.directory,
            "teacher_cache_teacher": self.reader.cache.metadata.teacher,
        }

    def describe(self) -> str:
        return (
            f"training from the teacher cache {self.reader.directory}: "
            f"{self.reader.cache.metadata.teacher}"
        )


__all__ = ["CacheTeacher"]
