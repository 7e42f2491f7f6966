"""Skew KL (DistiLLM), KL(P ‖ α P + (1 − α) Q)."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import Divergence, row_sum_of_products, unit_interval
from lightning_kd.losses.divergences.forward_kl import ForwardKL


class SkewKL(Divergence):
    """KL(P ‖ M) with ``M = α P + (1 − α) Q`` (DistiLLM's skew KL, ``skewed_forward_kl``).

    ``alpha = 0`` is forward KL; a small ``alpha`` keeps the value and gradient bounded where
    the student gives a token far less mass than the teacher (``KL ≤ −log α``). DistiLLM's
    code logs the cross-entropy ``−Σ P log M``; this is the KL itself (they differ by the
    teacher's entropy, a constant, so the gradients agree).

    Gradient w.r.t. z: ``(1 − α) (Q c − P Q / M)`` with ``c = Σ_v P_v Q_v / M_v``.

    Args:
        alpha: skew in [0, 1] (DistiLLM's default 0.1); ``alpha = 1`` gives 0.

    Raises:
        ValueError: for an ``alpha`` outside [0, 1] or not a real number.
    """

    name = "skew_kl"

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = unit_interval("alpha", alpha)

    @property
    def extra_workspaces(self) -> int:
        return 0 if self.alpha == 0.0 else 2

    @property
    def label(self) -> str:
        return f"skew KL(α={self.alpha:g})"

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        if self.alpha == 0.0:  # in log space: no underflow of M where Q underflows
            return ForwardKL().chunk(student, teacher, temperature, vocab, work, grad, need_grad)
        alpha = self.alpha
        ratio_buf, m_buf = extra
        p = vocab.softmax(teacher, temperature, out=work)
        q = vocab.softmax(student, temperature, out=grad)
        m = torch.lerp(q, p, alpha, out=m_buf)  # M = α P + (1 − α) Q
        p_over_m = torch.div(p, m, out=ratio_buf)
        q_over_m = torch.div(q, m, out=m_buf) if need_grad else None
        terms = p_over_m.log_().mul_(p)  # P log(P / M)
        kl = row_sum_of_products(terms, p)
        if not need_grad:
            return vocab.all_sum(kl)
        pq_over_m = q_over_m.mul_(p)  # NaN only where P = Q = 0
        c = row_sum_of_products(pq_over_m, p)
        kl, c = vocab.all_sum(torch.stack([kl, c], 1)).unbind(1)
        q.mul_(c.unsqueeze(1)).sub_(pq_over_m).mul_(1.0 - alpha)  # (1 − α)(Q c − P Q / M)
        return kl
