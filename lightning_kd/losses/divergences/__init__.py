"""Divergences for :class:`~lightning_kd.KDLoss`, one small file each (only the chunk math)."""

from lightning_kd.losses.divergences.base import Divergence, row_sum_of_products
from lightning_kd.losses.divergences.forward_kl import ForwardKL
from lightning_kd.losses.divergences.reverse_kl import ReverseKL

__all__ = ["Divergence", "ForwardKL", "ReverseKL", "row_sum_of_products"]
