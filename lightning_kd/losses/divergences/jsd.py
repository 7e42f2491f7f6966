"""Generalized Jensen-Shannon divergence (GKD), in TRL's ``generalized_jsd_loss`` convention."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import (
    Divergence,
    row_blocks,
    row_sum_of_products,
    unit_interval,
)
from lightning_kd.losses.divergences.forward_kl import ForwardKL
from lightning_kd.losses.divergences.reverse_kl import ReverseKL


class JSD(Divergence):
    """``β · KL(P ‖ M) + (1 − β) · KL(Q ‖ M)`` with ``M = β P + (1 − β) Q``.

    Exactly TRL's ``GKDTrainer.generalized_jsd_loss``: ``beta = 0`` is KL(P ‖ Q) (forward KL)
    and ``beta = 1`` is KL(Q ‖ P) (reverse KL); these two are special cases there and here (the
    formula itself tends to 0 at both ends). Bounded by ``−β log β − (1 − β) log(1 − β)``.

    Gradient w.r.t. z: ``(1 − β) Q (log(Q / M) − KL(Q ‖ M))``.

    Args:
        beta: interpolation weight in [0, 1]; 0.5 is the symmetric Jensen-Shannon divergence.

    Raises:
        ValueError: for a ``beta`` outside [0, 1] or not a real number.
    """

    name = "jsd"

    def __init__(self, beta: float = 0.5) -> None:
        self.beta = unit_interval("beta", beta)

    @property
    def extra_workspaces(self) -> int:
        return 2 if 0.0 < self.beta < 1.0 else 0

    @property
    def label(self) -> str:
        return f"JSD(β={self.beta:g})"

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        if self.beta in (0.0, 1.0):
            endpoint = ForwardKL() if self.beta == 0.0 else ReverseKL()
            return endpoint.chunk(student, teacher, temperature, vocab, work, grad, need_grad)
        beta = self.beta
        ratio_buf, m_buf = extra
        p = vocab.softmax(teacher, temperature, out=work)
        q = vocab.softmax(student, temperature, out=grad)
        sums = p.new_empty((p.shape[0], 2))  # per row: KL(P ‖ M), KL(Q ‖ M) (local shares)
        # The mixture lives in [r, V] blocks; once a block's KL(P ‖ M) is summed, P's rows are
        # dead and take Q log(Q / M) for the gradient.
        for rows in row_blocks(p.shape[0], m_buf.shape[0]):
            p_r, q_r = p[rows], q[rows]
            k = p_r.shape[0]
            m = torch.lerp(q_r, p_r, beta, out=m_buf[:k])  # M = β P + (1 − β) Q
            terms_p = torch.div(p_r, m, out=ratio_buf[:k]).log_().mul_(p_r)  # P log(P / M)
            sums[rows, 0] = row_sum_of_products(terms_p, p_r)
            terms_q = torch.div(q_r, m, out=p_r).log_().mul_(q_r)  # Q log(Q / M)
            sums[rows, 1] = row_sum_of_products(terms_q, q_r)
        kl_p, kl_q = vocab.all_sum(sums).unbind(1)
        if need_grad:  # (1 − β) Q (log(Q / M) − KL(Q ‖ M)); Q log(Q / M) is in work
            torch.addcmul(p, q, kl_q.unsqueeze(1), value=-1.0, out=q).mul_(1.0 - beta)
        return kl_p.mul(beta).add_(kl_q, alpha=1.0 - beta)
