"""``KDOptions``: the options the distillation losses share, as one frozen value.

:class:`~lightning_kd.KDLoss`, :class:`~lightning_kd.losses.LinearKDLoss` and
:class:`~lightning_kd.losses.TopKKDLoss` take the same options (see :class:`~lightning_kd.KDLoss`
for what each means). They are checked once, here, when the value is made; a loss holds one
value (``loss.options``) and one loss is derived from another's options with
``OtherLoss.from_options(loss.options, **changes)`` or, following the other loss when its
``kd_ratio`` is assigned later, ``OtherLoss.from_options(loss, **changes)``. Imports nothing from
Lightning.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch.distributed as dist

from lightning_kd.checks import check_bool, check_int, check_unit_interval
from lightning_kd.losses.divergences import Divergence, ForwardKL, resolve_divergence


def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float when it is a finite real number > 0.

    Raises:
        ValueError: for a bool, a non-real, a non-finite or a non-positive value.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise ValueError(f"temperature must be a real number > 0, got {temperature!r}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}.")
    return float(temperature)


@dataclass(frozen=True)
class KDOptions:
    """The options of a distillation loss, checked when made (immutable).

    Attributes:
        ignore_index: label value of the tokens to leave out.
        temperature: softmax temperature ``T`` of the divergence (finite, > 0).
        fp32_upcast: compute softmaxes in fp32 even for half-precision inputs.
        tp_group: process group of a vocabulary sharded over plain local-shard tensors.
        chunk_size: tokens per chunk of the pass (0: all at once).
        divergence: the divergence (a name is resolved to its object, e.g. ``ForwardKL()``).
        kd_ratio: weight of the divergence in [0, 1] (the rest weighs the cross-entropy).

    Raises:
        ValueError: for a non-positive or non-finite temperature, a negative chunk_size, a
            ``kd_ratio`` outside [0, 1], an unknown divergence name, an object that is not a
            ``Divergence``, or arguments of the wrong type.
    """

    ignore_index: int = -100
    temperature: float = 1.0
    fp32_upcast: bool = True
    tp_group: dist.ProcessGroup | None = None
    chunk_size: int = 0
    divergence: Divergence = field(default_factory=ForwardKL, kw_only=True)
    kd_ratio: float = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        check_int("ignore_index", self.ignore_index)
        check_int("chunk_size (0 = unchunked)", self.chunk_size, 0)
        check_bool("fp32_upcast", self.fp32_upcast)
        set_field = object.__setattr__  # frozen: normalise the checked values in place
        set_field(self, "temperature", check_temperature(self.temperature))
        set_field(self, "divergence", resolve_divergence(self.divergence))
        set_field(self, "kd_ratio", check_unit_interval("kd_ratio", self.kd_ratio))

    def replace(self, **changes: Any) -> KDOptions:
        """A copy with ``changes`` applied (checked like the constructor's arguments).

        Raises:
            ValueError: for a name that is not an option, or a value the constructor refuses.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown loss options {unknown}; the options are {names}.")
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as constructor keyword arguments of any of the three losses."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


__all__ = ["KDOptions", "check_temperature"]
