"""Divergences for :class:`~lightning_kd.KDLoss`, one small file each (only the chunk math).

Each is also reachable by name (:data:`DIVERGENCES`, :func:`resolve_divergence`), which is
what ``KDLoss(divergence="...")`` and YAML configs use.
"""

from lightning_kd.losses.divergences.base import (
    Divergence,
    row_blocks,
    row_sum_of_products,
    unit_interval,
)
from lightning_kd.losses.divergences.forward_kl import ForwardKL
from lightning_kd.losses.divergences.jsd import JSD
from lightning_kd.losses.divergences.reverse_kl import ReverseKL
from lightning_kd.losses.divergences.skew_kl import SkewKL
from lightning_kd.losses.divergences.skew_reverse_kl import SkewReverseKL
from lightning_kd.losses.divergences.tvd import TVD

#: The divergences by the name ``KDLoss(divergence=...)`` accepts (default parameters).
DIVERGENCES: dict[str, type[Divergence]] = {
    cls.name: cls for cls in (ForwardKL, ReverseKL, JSD, TVD, SkewKL, SkewReverseKL)
}


def resolve_divergence(divergence: str | Divergence) -> Divergence:
    """A :class:`Divergence` object from a name in :data:`DIVERGENCES` or an object.

    Raises:
        ValueError: for an unknown name or anything that is neither a name nor a Divergence.
    """
    if isinstance(divergence, Divergence):
        return divergence
    names = ", ".join(DIVERGENCES)
    if isinstance(divergence, str):
        if divergence not in DIVERGENCES:
            raise ValueError(
                f"unknown divergence {divergence!r}; choose one of {names}, or pass a "
                "Divergence object (e.g. JSD(beta=0.5))."
            )
        return DIVERGENCES[divergence]()
    raise ValueError(
        f"divergence must be one of the names {names} or a Divergence object, got "
        f"{type(divergence).__name__} {divergence!r}."
    )


__all__ = [
    "DIVERGENCES",
    "JSD",
    "TVD",
    "Divergence",
    "ForwardKL",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "resolve_divergence",
    "row_blocks",
    "row_sum_of_products",
    "unit_interval",
]
