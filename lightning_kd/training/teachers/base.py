"""The interface every kind of teacher implements for ``DistillationModule``.

A :class:`TeacherBackend` answers, for one kind of teacher, everything the module would
otherwise branch on: how the teacher is built and placed, what each model hands the loss for a
batch, the loss of the batch, the teacher's cross-entropy for evaluation, the settings a
checkpoint records, and a one-line description printed when a fit starts. The module keeps the
orchestration (steps, token windows, metrics, parallelisation order) and calls these methods.

Adding a kind of teacher (e.g. one served by another process):

1. Write one file beside this one with a subclass of :class:`TeacherBackend`. Implement
   :meth:`~TeacherBackend.setup` (build the loss objects it needs, once, from the module's
   loss: ``SomeLoss.from_options(loss, ...)`` so that an annealed ``kd_ratio`` reaches them),
   :meth:`~TeacherBackend.run_teacher`, :meth:`~TeacherBackend.loss`,
   :meth:`~TeacherBackend.teacher_cross_entropy`, :meth:`~TeacherBackend.settings` and
   :meth:`~TeacherBackend.describe`; override the other methods only when the defaults (no
   teacher model to build, the student's plain forward, nothing to place) do not fit.
2. Pass an instance as ``DistillationModule(student, teacher_backend=YourTeacher(...))`` (in
   YAML: ``model.init_args.teacher_backend.class_path``); the module needs no edit.
3. Test it in its own test file against a plain reference of its loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.models.contract import packing_kwargs

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule
    from lightning_kd.training.teacher import TeacherSource

#: ``on_meta(role, model_or_factory, checkpoint, prefix)``: the model built on the meta device
#: for sharded loading (its weights read later, into each rank's shards), or None when it is
#: built in full.
MetaBuilder = Callable[..., nn.Module | None]


def run_model(model: nn.Module, role: str, method: str, batch: Mapping[str, Tensor]) -> Any:
    """``model.<method>(input_ids [B, S], position_ids=...)`` (``model(...)`` for
    ``"forward"``): the batch's ``position_ids`` [B, S] are passed when it carries them (packed
    sequences; both models get the same). Other methods must be registered FSDP2 forward
    methods when the model is sharded (the fused head's ``hidden_states`` is)."""
    kwargs = packing_kwargs(model, role, method, batch)
    # ``forward`` through ``__call__``: FSDP2 (and any module hook) runs around it.
    call = model if method == "forward" else getattr(model, method)
    return call(batch["input_ids"], **kwargs)


class TeacherBackend(ABC):
    """One kind of teacher behind ``DistillationModule``.

    The module calls :meth:`setup` once with its loss (in its constructor), :meth:`build` and
    :meth:`prepare` once in ``configure_model``, :meth:`place` and :meth:`after_fsdp` around
    the parallelisation of each model, and the ``run_*``, :meth:`loss` and
    :meth:`teacher_cross_entropy` methods every step. The module owns ``student`` and
    ``teacher`` (so checkpoints keep their keys) and hands them over; a backend keeps only
    references it needs between calls (e.g. the fused head's FSDP2 unit owners), never
    parameters of its own.
    """

    #: Whether the loss reads both models' hidden states and heads instead of their logits.
    fused_head: bool = False

    #: Where the teacher model comes from (None for a kind without a model, e.g. a cache).
    source: TeacherSource | None = None

    @abstractmethod
    def setup(self, loss: KDLoss) -> None:
        """Build the loss objects this kind needs, once, from the module's ``loss`` (the one
        source of truth for the options; derived losses must follow its ``kd_ratio``).

        Raises:
            ValueError: for a loss this kind cannot work with.
        """

    def build(
        self, student: nn.Module, shared_vocab_size: int | None, on_meta: MetaBuilder
    ) -> nn.Module | None:
        """The frozen teacher model, built and loaded, its vocabulary reconciled with the
        student's; None for a kind without a model (the default)."""
        return None

    def prepare(self, module: DistillationModule) -> None:
        """Checks before any parallelisation, once the models are built (default: none)."""
        return None

    def place(self, role: str, model: nn.Module) -> tuple[nn.Module, ...]:
        """Called for each model after tensor parallelism and before FSDP2 (or once without
        a mesh): the submodules to shard as FSDP2 units of their own (default: none)."""
        return ()

    def after_fsdp(self, role: str, model: nn.Module) -> None:
        """Called for each model after FSDP2 wrapped it (default: nothing)."""
        return None

    def run_student(self, module: DistillationModule, batch: Mapping[str, Tensor]) -> Any:
        """The student's output for the loss (default: its forward, logits [B, S, V])."""
        return run_model(module.student, "student", "forward", batch)

    def after_train_batch(self, module: DistillationModule) -> None:
        """Called at the end of every training step (default: nothing); a teacher that works
        ahead (e.g. a served one's prefetch) may stop the run here, at a step boundary."""
        return None

    @abstractmethod
    def run_teacher(self, module: DistillationModule, batch: Mapping[str, Tensor]) -> Any:
        """What the teacher hands the loss for ``batch`` (called under ``torch.no_grad()``)."""

    @abstractmethod
    def loss(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> KDLossOutput:
        """The loss of the batch with its per-token values (``return_per_token=True``)."""

    @abstractmethod
    def teacher_cross_entropy(
        self, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> Tensor | None:
        """The teacher's cross-entropy on the batch's labels at temperature 1, summed over the
        valid tokens (0-dim, detached), or None when this kind does not know it."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What a checkpoint records about the teacher (compared when one is loaded)."""

    @abstractmethod
    def describe(self) -> str:
        """One line that says which teacher the run distils from (printed when a fit starts)."""


__all__ = ["MetaBuilder", "TeacherBackend", "run_model"]
