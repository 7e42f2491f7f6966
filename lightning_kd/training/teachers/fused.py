"""The fused-head teacher: a live teacher whose lm_head, and the student's, run inside the loss.

Both models run up to their final hidden states and :class:`~lightning_kd.losses.LinearKDLoss`
reads both heads' weights, computing the logits chunk by chunk: no ``[N, V]`` logits exist.
Under FSDP2 a head's parameters live in one unit, its *owner* (the head, or the model when the
head is tied to a parameter outside it), found here after tensor parallelism and sharded as its
own unit; the FSDP2 mechanics are in :mod:`lightning_kd.training.fused_head`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.linear_kd_loss import LinearKDLoss, fused_chunk_size
from lightning_kd.training.fused_head import (
    FusedHeadOutput,
    call_as_forward,
    fused_head_of,
    gathered,
    head_is_tied,
    register_fused_methods,
)
from lightning_kd.training.teachers.base import run_model
from lightning_kd.training.teachers.live import LiveTeacher, summed

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule
    from lightning_kd.training.teacher import TeacherSource

#: The override points whose outputs must be a FusedHeadOutput for the loss to be fused.
_RUN_METHODS = ("run_student", "run_teacher")


class FusedHeadTeacher(LiveTeacher):
    """A live teacher with both lm_heads fused into the loss (``fused_head=True``).

    The models must implement ``hidden_states`` and ``output_head``
    (:class:`~lightning_kd.models.contract.SupportsFusedHead`). ``run_student`` /
    ``run_teacher`` return :class:`~lightning_kd.training.fused_head.FusedHeadOutput`; outputs
    with logits (from an override that does not call ``super()``) go through the live
    teacher's logits loss instead.

    Args:
        source: where the teacher comes from.
    """

    fused_head = True
    compares = "both lm_heads fused into the loss"

    def __init__(self, source: TeacherSource) -> None:
        super().__init__(source)
        self._owners: dict[str, nn.Module] = {}  # role -> module whose FSDP2 unit has the head

    def setup(self, loss: KDLoss) -> None:
        """Raises: ValueError for a loss that is not a ``KDLoss`` (its options make the
        ``LinearKDLoss``; an unchunked loss becomes 1024 valid tokens per chunk)."""
        if not isinstance(loss, KDLoss):
            raise ValueError(
                "fused_head=True computes the loss with LinearKDLoss from a KDLoss's settings; "
                f"got a {type(loss).__name__} loss."
            )
        super().setup(loss)
        chunk_size = fused_chunk_size(loss.options)
        self._linear = LinearKDLoss.from_options(loss, chunk_size=chunk_size)
        self._linear_cross_entropy = LinearKDLoss.from_options(
            loss, chunk_size=chunk_size, kd_ratio=0.0
        )

    def prepare(self, module: DistillationModule) -> None:
        """Refuse models without hidden states and head (before any parallelisation); warn
        when an override of ``run_student`` / ``run_teacher`` may not return fused outputs."""
        if not self._owners:
            for name in _RUN_METHODS:
                if getattr(type(module), name).__qualname__ != f"DistillationModule.{name}":
                    rank_zero_warn(
                        f"fused_head=True but {type(module).__name__}.{name} is overridden: "
                        "the loss is fused only if it returns a FusedHeadOutput (e.g. "
                        f"super().{name}(batch)); outputs with logits run unfused."
                    )
        for role in ("student", "teacher"):
            fused_head_of(getattr(module, role), role)

    def _owner(self, role: str, model: nn.Module) -> nn.Module:
        """The module whose FSDP2 unit holds the ``role`` model's head: the head itself, or the
        model when the head is tied to a parameter outside it. Found once per role (after
        tensor parallelism, which may untie a head)."""
        if role not in self._owners:
            head = fused_head_of(model, role)
            self._owners[role] = model if head_is_tied(model, head) else head
        return self._owners[role]

    def place(self, role: str, model: nn.Module) -> tuple[nn.Module, ...]:
        owner = self._owner(role, model)
        return (owner,) if owner is not model else ()

    def after_fsdp(self, role: str, model: nn.Module) -> None:
        register_fused_methods(model, self._owner(role, model))

    def _run(self, model: nn.Module, role: str, batch: Mapping[str, Tensor]) -> FusedHeadOutput:
        hidden = run_model(model, role, "hidden_states", batch)
        return FusedHeadOutput(hidden, model.output_head(), self._owner(role, model))

    def run_student(
        self, module: DistillationModule, batch: Mapping[str, Tensor]
    ) -> FusedHeadOutput:
        return self._run(module.student, "student", batch)

    def run_teacher(
        self, module: DistillationModule, batch: Mapping[str, Tensor]
    ) -> FusedHeadOutput:
        return self._run(module.teacher, "teacher", batch)

    def loss(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> KDLossOutput:
        """The loss from both heads: the student's head gathered as a forward of its FSDP2
        unit (its gradient is reduce-scattered), the frozen teacher's gathered around it.

        Raises:
            ValueError: when only the student's output is a :class:`FusedHeadOutput`.
        """
        if not isinstance(student_output, FusedHeadOutput):  # an override returned logits
            return super().loss(student_output, teacher_output, batch)
        if not isinstance(teacher_output, FusedHeadOutput):
            raise ValueError(
                "with fused_head=True, run_student and run_teacher must both return a "
                f"FusedHeadOutput, got {type(teacher_output).__name__} for the teacher."
            )
        student, teacher, labels = student_output, teacher_output, batch["labels"]
        linear = self._linear

        def fused(student_hidden: Tensor) -> KDLossOutput:
            # Read the weights here, inside the gathered forward: outside it they are shards.
            return linear(
                student_hidden, student.head.weight, teacher.hidden, teacher.head.weight, labels,
                student_bias=student.head.bias, teacher_bias=teacher.head.bias,
                return_per_token=True,
            )  # fmt: skip

        with gathered(teacher.owner):
            return call_as_forward(student.owner, fused, student.hidden)

    def teacher_cross_entropy(
        self, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> Tensor | None:
        """From the teacher's hidden states and head (no logits), its head gathered."""
        if not isinstance(teacher_output, FusedHeadOutput):
            return super().teacher_cross_entropy(teacher_output, batch)
        labels, head = batch["labels"], teacher_output.head
        with gathered(teacher_output.owner):
            mean = self._linear_cross_entropy(
                teacher_output.hidden, head.weight, None, None, labels, student_bias=head.bias
            )
        return summed(mean, labels, self._linear_cross_entropy.ignore_index)


__all__ = ["FusedHeadTeacher"]
