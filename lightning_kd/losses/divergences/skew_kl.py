"""Skew KL (DistiLLM), KL(P ‖ α P + (1 − α) Q)."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import (
    Divergence,
    row_blocks,
    row_sum_of_products,
    unit_interval,
)
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
        sums = p.new_empty((p.shape[0], 2))  # per row: KL(P ‖ M), c (local shares)
        # The mixture lives in [r, V] blocks; once a block is summed, P's rows are dead and
        # take P Q / M for the gradient.
        for rows in row_blocks(p.shape[0], m_buf.shape[0]):
            p_r, q_r = p[rows], q[rows]
            k = p_r.shape[0]
            m = torch.lerp(q_r, p_r, alpha, out=m_buf[:k])  # M = α P + (1 − α) Q
            terms = torch.div(p_r, m, out=ratio_buf[:k]).log_().mul_(p_r)  # P log(P / M)
            sums[rows, 0] = row_sum_of_products(terms, p_r)
            if need_grad:
                pq_over_m = torch.div(q_r, m, out=ratio_buf[:k]).mul_(p_r)  # NaN iff P = Q = 0
                sums[rows, 1] = row_sum_of_products(pq_over_m, p_r)
                p_r.copy_(pq_over_m)
        if not need_grad:
            return vocab.all_sum(sums[:, 0].contiguous())
        kl, c = vocab.all_sum(sums).unbind(1)
        q.mul_(c.unsqueeze(1)).sub_(p).mul_(1.0 - alpha)  # (1 − α)(Q c − P Q / M)
        return kl
