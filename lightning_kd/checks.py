"""Argument checks at the public boundary, shared by every package (imports only the standard
library, so :mod:`lightning_kd.losses` stays free of Lightning).

Each returns the value when it is valid and raises a ``ValueError`` that names the argument,
what was expected and what was given. ``bool`` is refused where an int is expected (it is an
int subclass, and ``chunk_size=True`` is a mistake, not 1).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (``>= minimum`` when given).

    Raises:
        ValueError: for a non-int (bools included) or a value below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool.

    Raises:
        ValueError: for anything else (e.g. the string ``"false"``).
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}.")
    return value


def check_unit_interval(name: str, value: Any) -> float:
    """``value`` as a float if it is a real number in [0, 1].

    Raises:
        ValueError: for a bool, a non-real, NaN or a value outside [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}.")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return float(value)
