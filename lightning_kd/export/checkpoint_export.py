"""Export the student of a run's Lightning checkpoint (what ``lightning-kd export`` does).

The student's architecture comes from the run's (not yet configured) LightningModule: the
student of a :class:`~lightning_kd.DistillationModule` (``student.*`` weights) or the model of
a :class:`~lightning_kd.CausalLMModule` (``model.*``), built on its own, on CPU, without the
teacher. Its weights come from the checkpoint (a single file or a distributed checkpoint
directory, consolidated by DCP on this one process).
"""

from __future__ import annotations

import copy as copy_module
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from lightning_kd.export.hf_export import (
    DEFAULT_MAX_SHARD_SIZE,
    export_student,
    run_special_tokens,
    run_tokenizer,
)
from lightning_kd.export.student_state import student_state_from_checkpoint
from lightning_kd.models.lora import has_lora


@runtime_checkable
class ExportableModule(Protocol):
    """A LightningModule whose student can be exported (``DistillationModule`` and
    ``CausalLMModule`` are)."""

    def export_model(self, build: bool = False) -> tuple[nn.Module | None, str]:
        """(the model to export or None when not built, its key prefix in checkpoints); with
        ``build``, built from its factory when it is not built yet (on CPU, without a teacher)."""
        ...


def student_of(module: nn.Module, build: bool = False) -> tuple[nn.Module | None, str]:
    """(the model to export, its checkpoint key prefix) of a LightningModule.

    Args:
        module: a :class:`~lightning_kd.DistillationModule` (its ``student``), a
            ``CausalLMModule`` (its ``model``), a subclass of either, or any module with
            ``export_model`` (:class:`ExportableModule`).
        build: build the model from its factory when the module has not yet (on CPU; the
            teacher is not built).

    Raises:
        ValueError: a module without ``export_model``.
    """
    if not isinstance(module, ExportableModule):
        raise ValueError(
            f"{type(module).__name__} has no student (or model) to export; export works for "
            "DistillationModule and CausalLMModule runs (modules with export_model)."
        )
    return module.export_model(build=build)


def with_frozen_base(student: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A LoRA student's checkpoint holds its adapters, not its frozen base: the base's weights
    are taken from ``student`` as its config built it (``pretrained_path`` / ``init_from``;
    a randomly initialised base is the same only under the same seed). Other students:
    ``state`` as is."""
    if not has_lora(student):
        return state
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    base = {k: v for k, v in student.state_dict().items() if k in frozen and k not in state}
    return {**state, **base}


def load_student(
    module: nn.Module, ckpt_path: str | os.PathLike[str], *, copy: bool = False
) -> nn.Module:
    """The student (or model) of ``module`` built from its config, with the weights of
    checkpoint ``ckpt_path`` (single file or distributed directory) loaded into it.

    Args:
        module: the run's LightningModule as its config builds it (not configured).
        ckpt_path: the checkpoint.
        copy: load into a copy, leaving the module's own student as built (to load several
            checkpoints of one config side by side).

    Raises:
        ValueError: a module without a student, a missing or unreadable checkpoint, or weights
            that are not the config's student's (missing or unexpected keys).
    """
    student, prefix = student_of(module, build=True)
    if student is None:
        raise ValueError(f"the config's module has no student to load {str(ckpt_path)!r} into.")
    if copy:
        student = copy_module.deepcopy(student)
    state = with_frozen_base(student, student_state_from_checkpoint(ckpt_path, prefix))
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(ckpt_path)!r} does not hold the config's student: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    return student


def export_checkpoint(
    module: nn.Module,
    ckpt_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    datamodule: Any | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write the student of checkpoint ``ckpt_path`` as a Hugging Face directory.

    Args:
        module: the run's LightningModule as its config builds it (not configured).
        ckpt_path: a single-file Lightning checkpoint or a distributed checkpoint directory.
        output_dir: where to write (see :func:`~lightning_kd.export.hf_export.export_student`).
        datamodule: the run's data module, whose HF tokenizer is saved with the model.
        max_shard_size: largest safetensors file, bytes or e.g. ``"5GB"``.
        overwrite: replace an earlier export in ``output_dir``.

    Returns:
        The output directory.

    Raises:
        ValueError: a missing or unreadable checkpoint, one without the student's weights, or
            weights that are not the config's student's.
    """
    student, prefix = student_of(module, build=True)
    state = with_frozen_base(student, student_state_from_checkpoint(ckpt_path, prefix))
    tokenizer = run_tokenizer(student, datamodule)
    return export_student(
        student, state, output_dir, tokenizer=tokenizer,
        max_shard_size=max_shard_size, overwrite=overwrite,
        special_tokens=run_special_tokens(datamodule, tokenizer),
    )  # fmt: skip
