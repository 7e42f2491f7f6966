"""The constructor choice of ``DistillationModule`` that needs more than a type check: which
loss carries the ``kd_ratio`` mix (which teacher is :func:`~lightning_kd.training.teachers.
select_teacher`'s)."""

from __future__ import annotations

import copy
import warnings

from lightning_kd.checks import check_unit_interval
from lightning_kd.losses.cross_tokenizer_loss import CrossTokenizerLoss
from lightning_kd.losses.kd_loss import KDLoss


def resolve_loss(
    loss: KDLoss | CrossTokenizerLoss | None, kd_ratio: float | None
) -> KDLoss | CrossTokenizerLoss:
    """The module's loss: ``loss``, or ``KDLoss(kd_ratio=kd_ratio)``. The loss is the one
    source of truth for the mix: a ``kd_ratio`` that contradicts a given loss's is an error,
    except against a loss at the default 1.0, where a copy of the loss takes it with a
    DeprecationWarning (0.1 configs set ``kd_ratio`` on the module)."""
    if kd_ratio is not None:
        kd_ratio = check_unit_interval("kd_ratio", kd_ratio)
    if loss is None:
        return KDLoss() if kd_ratio is None else KDLoss(kd_ratio=kd_ratio)
    if not isinstance(loss, (KDLoss, CrossTokenizerLoss)):
        raise ValueError(
            f"loss must be a KDLoss (or a subclass), or a cross-tokenizer loss (ULDLoss, "
            f"HybridKDLoss), got {type(loss).__name__}; the teacher backends derive their "
            "losses from its options."
        )
    if kd_ratio is not None and kd_ratio != 1.0 and loss.kd_ratio == 1.0:
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
    if kd_ratio is not None and kd_ratio != loss.kd_ratio:
        raise ValueError(
            f"kd_ratio={kd_ratio} contradicts the loss's kd_ratio={loss.kd_ratio}; set it in "
            "one place, on the loss "
            "(KDLoss(kd_ratio=...), in YAML `model.init_args.loss.init_args.kd_ratio`)."
        )
    return loss
