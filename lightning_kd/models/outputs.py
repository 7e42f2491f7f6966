"""Reading logits from a model's output: a tensor, or a mapping/object with ``logits``.

Lives with the models (the lowest package that knows what a model returns) so that the
teacher cache, the training modules and the export all read outputs the same way without
importing upward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["find_logits", "logits_of"]


def find_logits(output: Any) -> Tensor | None:
    """Logits from a model output (a tensor, or a mapping/object with ``logits``), else None.

    Args:
        output: what a model's forward returned.

    Returns:
        The ``[..., V]`` logits tensor (any dtype), or None when the output carries none.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
    else:
        logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def logits_of(output: Any) -> Tensor:
    """Logits from a model output: a tensor, or an object/dict with ``logits`` (HF style).

    Args:
        output: what a model's forward returned.

    Returns:
        The ``[..., V]`` logits tensor (any dtype).

    Raises:
        ValueError: when the output carries no logits tensor.
    """
    logits = find_logits(output)
    if logits is None:
        raise ValueError(
            f"model output must be a logits tensor or have a `logits` field, got {type(output)}."
        )
    return logits
