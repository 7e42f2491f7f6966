"""The constructor choices of ``DistillationModule`` that need more than a type check: which
teacher (a live model or a cache), and which loss carries the ``kd_ratio`` mix."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from lightning_kd.checks import check_unit_interval
from lightning_kd.losses.kd_loss import KDLoss


def check_teacher_choice(
    teacher: Any, teacher_cache: str | None, teacher_checkpoint: str | None, fused_head: bool
) -> None:
    """A live teacher or a teacher cache, exactly one, and nothing that needs the other."""
    if (teacher is None) == (teacher_cache is None):
        raise ValueError(
            "DistillationModule needs exactly one of teacher (a model or factory) and "
            f"teacher_cache (a directory), got teacher={type(teacher).__name__}, "
            f"teacher_cache={teacher_cache!r}."
        )
    if teacher_cache is not None and teacher_checkpoint is not None:
        raise ValueError("teacher_checkpoint has no use with teacher_cache (no teacher is built).")
    if teacher_cache is not None and fused_head:
        raise ValueError(
            "fused_head=True needs the teacher's lm_head; a teacher cache has none. Use "
            "fused_head=False with teacher_cache."
        )


def resolve_loss(loss: KDLoss | None, kd_ratio: float | None) -> KDLoss:
    """The module's loss: ``loss``, or ``KDLoss(kd_ratio=kd_ratio)``. The loss is the one
    source of truth for the mix: a ``kd_ratio`` that contradicts a given loss's is an error,
    except against a loss at the default 1.0, where a copy of the loss takes it with a
    DeprecationWarning (0.1 configs set ``kd_ratio`` on the module)."""
    if kd_ratio is not None:
        kd_ratio = check_unit_interval("kd_ratio", kd_ratio)
    if loss is None:
        return KDLoss() if kd_ratio is None else KDLoss(kd_ratio=kd_ratio)
    if kd_ratio is not None and kd_ratio != 1.0 and getattr(loss, "kd_ratio", None) == 1.0:
        warnings.warn(
            f"DistillationModule(kd_ratio={kd_ratio}) with a loss at kd_ratio=1.0: the mix "
            "belongs to the loss since 0.2; set KDLoss(kd_ratio=...) (YAML "
            "`model.init_args.loss.init_args.kd_ratio`). Using the module's value.",
            DeprecationWarning,
            stacklevel=3,
        )
        loss = copy.copy(loss)
        loss.kd_ratio = kd_ratio
        return loss
    if kd_ratio is not None and kd_ratio != getattr(loss, "kd_ratio", 1.0):
        raise ValueError(
            f"kd_ratio={kd_ratio} contradicts the loss's kd_ratio="
            f"{getattr(loss, 'kd_ratio', 1.0)}; set it in one place, on the loss "
            "(KDLoss(kd_ratio=...), in YAML `model.init_args.loss.init_args.kd_ratio`)."
        )
    return loss
