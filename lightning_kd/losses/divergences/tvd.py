"""Total variation distance, ½ Σ |P − Q|."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import Divergence


class TVD(Divergence):
    """TVD(P, Q) = ½ Σ_v |P_v − Q_v|, in [0, 1]; symmetric and bounded.

    Gradient w.r.t. z: ``½ Q (σ − Σ_v Q_v σ_v)`` with ``σ = sign(Q − P)`` (the subgradient 0
    where ``P = Q``).
    """

    name = "tvd"

    @property
    def label(self) -> str:
        return "TVD(teacher, student)"

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        p = vocab.softmax(teacher, temperature, out=work)
        q = vocab.softmax(student, temperature, out=grad)
        diff = torch.sub(q, p, out=work)  # Q − P
        l1 = torch.linalg.vector_norm(diff, 1, dim=-1)
        if not need_grad:
            return vocab.all_sum(l1).mul_(0.5)
        q_sign = diff.sign_().mul_(q)  # Q σ (exactly 0 where Q is)
        l1, q_dot_sign = vocab.all_sum(torch.stack([l1, q_sign.sum(-1)], 1)).unbind(1)
        q.mul_(q_dot_sign.unsqueeze(1).mul(-0.5)).add_(q_sign, alpha=0.5)  # ½ (Q σ − Q Σ Q σ)
        return l1.mul_(0.5)
