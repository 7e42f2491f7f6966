"""Reverse KL, KL(Q_student ‖ P_teacher): mode-seeking (MiniLLM)."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import Divergence, row_sum_of_products


class ReverseKL(Divergence):
    """KL(Q ‖ P) = Σ_v Q (log Q − log P); gradient w.r.t. z is ``Q (log Q − log P − KL)``.

    Mode-seeking: the student may drop teacher modes it cannot fit, but is penalised for
    putting mass where the teacher has little.
    """

    name = "reverse_kl"

    @property
    def label(self) -> str:
        return "KL(student ‖ teacher)"

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        log_p = vocab.log_softmax(teacher, temperature, out=work)
        log_q = vocab.log_softmax(student, temperature, out=grad)
        delta = torch.sub(log_q, log_p, out=work)  # log Q − log P
        q = log_q.exp_()
        terms = delta.mul_(q)  # Q (log Q − log P), 0 where Q == 0
        value = vocab.all_sum(row_sum_of_products(terms, q))
        if need_grad:
            grad.mul_(-value.unsqueeze(1)).add_(terms)  # Q (log Q − log P − KL)
        return value
