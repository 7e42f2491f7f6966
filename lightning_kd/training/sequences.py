"""Where the token sequences of a step come from.

``DistillationModule`` asks its :attr:`~lightning_kd.DistillationModule.sequence_source` once
per training, validation and test step for the batch to distil on, before either model runs.
The default, :class:`DataLoaderSequences`, returns the data loader's batch as is. A source that
makes its own sequences (e.g. the student generating them, on-policy distillation) gets the
module, so it can run the student, and returns a batch of the same form: ``input_ids`` [B, S]
int64 and already-shifted ``labels`` [B, S] int64 (``ignore_index`` where no loss is wanted),
optionally ``position_ids`` [B, S].

A source with ``state_dict()`` / ``load_state_dict(state)`` (e.g. the counter of its random
draws) is saved in checkpoints under ``"sequence_source"`` and restored on resume.
:class:`~lightning_kd.training.on_policy.OnPolicySequences` (``DistillationModule(on_policy=)``)
is the on-policy source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule

#: The stages a source is called for.
STAGES = ("train", "val", "test")


@runtime_checkable
class SequenceSource(Protocol):
    """Gives the batch a step distils on.

    Args (of the call):
        module: the distillation module (its ``student``, ``teacher``, ``device``, ``trainer``).
        batch: the data loader's batch.
        stage: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        The batch to run both models and the loss on (the data loader's or a new one).
    """

    def __call__(
        self, module: DistillationModule, batch: Mapping[str, Tensor], stage: str
    ) -> Mapping[str, Tensor]: ...


class DataLoaderSequences:
    """The data loader's batch as is (the default source)."""

    def __call__(
        self, module: DistillationModule, batch: Mapping[str, Tensor], stage: str
    ) -> Mapping[str, Tensor]:
        return batch

    def __repr__(self) -> str:
        return "DataLoaderSequences()"


__all__ = ["STAGES", "DataLoaderSequences", "SequenceSource"]
