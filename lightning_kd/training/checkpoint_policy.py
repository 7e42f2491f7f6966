"""What a distillation checkpoint holds: the student (and any trainable extras), the loop state
and the run's settings, but by default not the frozen teacher.

The teacher is rebuilt from its own source on resume, so dropping it keeps checkpoints small.
Dropping its keys alone would make a strict load fail ("Missing key"), so loading fills them
from the teacher's current weights. The run's settings are recorded and a load into a module
configured differently warns by name: the checkpoint holds weights and loop state, not the
configuration (e.g. ``load_from_checkpoint`` without ``teacher_checkpoint`` would otherwise
evaluate against a random teacher).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

SETTINGS_KEY = "lightning_kd"


def _drop_teacher(
    attribute: str, module: nn.Module, state_dict: dict, prefix: str, *_: Any
) -> None:
    if getattr(module, "save_teacher", False):
        return
    for key in [k for k in state_dict if k.startswith(f"{prefix}{attribute}.")]:
        del state_dict[key]


def _restore_teacher(
    attribute: str, module: nn.Module, state_dict: dict, prefix: str, *_: Any
) -> None:
    teacher = getattr(module, attribute, None)
    if teacher is None:
        return
    for key, value in teacher.state_dict(prefix=f"{prefix}{attribute}.").items():
        state_dict.setdefault(key, value)


def teacher_free_checkpoints(module: nn.Module, attribute: str = "teacher") -> None:
    """Install the state-dict hooks on ``module``, which holds its teacher at ``attribute``.

    Saving drops ``attribute.*`` keys unless ``module.save_teacher`` is true; loading fills
    missing ``attribute.*`` keys from the teacher's current weights so strict loads succeed.
    """
    module.register_state_dict_post_hook(functools.partial(_drop_teacher, attribute))
    module.register_load_state_dict_pre_hook(functools.partial(_restore_teacher, attribute))


def record_settings(checkpoint: dict[str, Any], settings: Mapping[str, Any]) -> None:
    """Store the run's settings in a Lightning checkpoint dict."""
    checkpoint[SETTINGS_KEY] = dict(settings)


def check_settings(
    checkpoint: Mapping[str, Any],
    settings: Mapping[str, Any],
    warn: Callable[[str], None] | None = None,
    teacher_saved: bool = False,
) -> list[str]:
    """Compare a checkpoint's recorded settings with the current ones and warn on differences.

    Returns:
        One ``"key: saved X, now Y"`` line per difference (empty when none, or for checkpoints
        that recorded nothing).
    """
    saved = checkpoint.get(SETTINGS_KEY)
    if not isinstance(saved, Mapping):
        return []
    changed = [
        f"{key}: saved {value!r}, now {settings.get(key)!r}"
        for key, value in saved.items()
        if settings.get(key) != value
    ]
    if changed:
        message = (
            "this DistillationModule is configured differently from the one that saved the "
            "checkpoint (" + "; ".join(changed) + "). Pass the same constructor arguments: the "
            "checkpoint holds weights and loop state, not the configuration"
            + ("" if teacher_saved else ", and not the teacher's weights")
            + "."
        )
        (warn or (lambda text: warnings.warn(text, stacklevel=3)))(message)
    return changed


# ------------------------------------------------------------------ frozen student parameters
#: Checkpoint key of the frozen base's digest (LoRA students).
FROZEN_DIGEST_KEY = "lightning_kd_frozen_student"


def _frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def _drop_frozen(attribute: str, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    model = getattr(module, attribute, None)
    if model is None or not getattr(module, "drop_frozen_student", False):
        return
    for name in _frozen_names(model):
        state_dict.pop(f"{prefix}{attribute}.{name}", None)


def _restore_frozen(
    attribute: str, module: nn.Module, state_dict: dict, prefix: str, *_: Any
) -> None:
    model = getattr(module, attribute, None)
    if model is None or not getattr(module, "drop_frozen_student", False):
        return
    frozen = _frozen_names(model)
    for key, value in model.state_dict(prefix=f"{prefix}{attribute}.").items():
        if key.removeprefix(f"{prefix}{attribute}.") in frozen:
            state_dict.setdefault(key, value)


def trainable_only_checkpoints(module: nn.Module, attribute: str = "student") -> None:
    """While ``module.drop_frozen_student`` is true (a LoRA student), checkpoints leave out the
    student's frozen parameters (its base: rebuilt from its own source on resume, checked with
    :func:`frozen_digest`), and loading fills them from the current ones so strict loads pass.
    """
    module.register_state_dict_post_hook(functools.partial(_drop_frozen, attribute))
    module.register_load_state_dict_pre_hook(functools.partial(_restore_frozen, attribute))


def frozen_digest(model: nn.Module) -> list[float]:
    """``[count, sum, sum of squares]`` (float64) of ``model``'s frozen parameters: sharded
    (DTensor) parameters are reduced over their mesh, so every layout gives the same values up
    to summation order."""
    total = torch.zeros(3, dtype=torch.float64)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            continue
        local = p.detach()
        sums = torch.stack([local.double().sum(), local.double().pow(2).sum()])
        full = getattr(sums, "full_tensor", None)
        sums = (full() if callable(full) else sums).cpu()
        total += torch.cat([torch.tensor([float(p.numel())], dtype=torch.float64), sums])
    return [float(v) for v in total]


def check_frozen_digest(saved: Any, current: list[float], rel: float = 1e-5) -> None:
    """Refuse a resume onto another frozen base than the one the checkpoint was trained on.

    Raises:
        ValueError: when the digests differ (count exactly, sums beyond ``rel``).
    """
    if not isinstance(saved, list | tuple) or len(saved) != 3:
        return
    count_ok = saved[0] == current[0]
    sums_ok = all(
        abs(a - b) <= rel * max(abs(a), abs(b), 1.0)
        for a, b in zip(saved[1:], current[1:], strict=True)
    )
    if not (count_ok and sums_ok):
        raise ValueError(
            "the checkpoint holds the LoRA adapters of another frozen base model (its "
            f"parameters' [count, sum, sum of squares] were {saved}, now {current}): the "
            "checkpoint does not store the base, so resume with the student built from the "
            "same weights (pretrained_path / init_from) as the run that saved it."
        )
