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
