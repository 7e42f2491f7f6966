"""Skew reverse KL (DistiLLM), KL(Q ‖ α Q + (1 − α) P)."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import Divergence, row_sum_of_products, unit_interval
from lightning_kd.losses.divergences.reverse_kl import ReverseKL


class SkewReverseKL(Divergence):
    """KL(Q ‖ M) with ``M = α Q + (1 − α) P`` (DistiLLM's ``skewed_reverse_kl``).

    ``alpha = 0`` is reverse KL; a small ``alpha`` keeps it finite where the teacher gives a
    token (almost) no mass (``KL ≤ −log α``).

    Gradient w.r.t. z: ``Q log(Q / M) − α Q² / M + Q (α S − KL)`` with ``S = Σ_v Q_v² / M_v``.

    Args:
        alpha: skew in [0, 1] (DistiLLM's default 0.1); ``alpha = 1`` gives 0.

    Raises:
        ValueError: for an ``alpha`` outside [0, 1] or not a real number.
    """

    name = "skew_reverse_kl"

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = unit_interval("alpha", alpha)

    @property
    def extra_workspaces(self) -> int:
        return 0 if self.alpha == 0.0 else 1

    @property
    def label(self) -> str:
        return f"skew reverse KL(α={self.alpha:g})"

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        if self.alpha == 0.0:
            return ReverseKL().chunk(student, teacher, temperature, vocab, work, grad, need_grad)
        alpha = self.alpha
        (log_buf,) = extra
        p = vocab.softmax(teacher, temperature, out=work)
        q = vocab.softmax(student, temperature, out=grad)
        m = torch.lerp(p, q, alpha, out=work)  # M = α Q + (1 − α) P
        q_over_m = torch.div(q, m, out=work)
        terms = torch.log(q_over_m, out=log_buf).mul_(q)  # Q log(Q / M)
        kl = row_sum_of_products(terms, q)
        if not need_grad:
            return vocab.all_sum(kl)
        q2_over_m = q_over_m.mul_(q)  # Q² / M, NaN only where Q = M = 0
        s = row_sum_of_products(q2_over_m, q)
        kl, s = vocab.all_sum(torch.stack([kl, s], 1)).unbind(1)
        # Q log(Q / M) − α Q² / M + Q (α S − KL)
        q.mul_(s.mul(alpha).sub_(kl).unsqueeze(1)).add_(terms).add_(q2_over_m, alpha=-alpha)
        return kl
