"""Skew reverse KL (DistiLLM), KL(Q ‖ α Q + (1 − α) P)."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import (
    Divergence,
    row_blocks,
    row_sum_of_products,
    unit_interval,
)
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
        sums = p.new_empty((p.shape[0], 2))  # per row: KL(Q ‖ M), S (local shares)
        # Block by block of [r, V] rows, M and Q / M replace P's rows (P is read only there);
        # for the gradient they end as Q log(Q / M) − α Q² / M.
        for rows in row_blocks(p.shape[0], log_buf.shape[0]):
            p_r, q_r = p[rows], q[rows]
            m = torch.lerp(p_r, q_r, alpha, out=p_r)  # M = α Q + (1 − α) P
            q_over_m = torch.div(q_r, m, out=p_r)
            terms = torch.log(q_over_m, out=log_buf[: p_r.shape[0]]).mul_(q_r)  # Q log(Q / M)
            sums[rows, 0] = row_sum_of_products(terms, q_r)
            if need_grad:
                q2_over_m = q_over_m.mul_(q_r)  # Q² / M, NaN only where Q = M = 0
                sums[rows, 1] = row_sum_of_products(q2_over_m, q_r)
                torch.add(terms, q2_over_m, alpha=-alpha, out=p_r)
        if not need_grad:
            return vocab.all_sum(sums[:, 0].contiguous())
        kl, s = vocab.all_sum(sums).unbind(1)
        # Q log(Q / M) − α Q² / M + Q (α S − KL)
        q.mul_(s.mul(alpha).sub_(kl).unsqueeze(1)).add_(p)
        return kl
