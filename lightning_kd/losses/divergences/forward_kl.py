"""Forward KL, KL(P_teacher ‖ Q_student): the default distillation divergence."""

from __future__ import annotations

import torch

from lightning_kd.losses.divergences.base import Divergence, row_sum_of_products


class ForwardKL(Divergence):
    """KL(P ‖ Q) = Σ_v P (log P − log Q); gradient w.r.t. z = s / T is ``Q − P``.

    Mass-covering: the student is pushed to put probability wherever the teacher does.
    """

    name = "forward_kl"

    @property
    def label(self) -> str:
        return "KL(teacher ‖ student)"

    def chunk(self, student, teacher, temperature, vocab, work, grad, need_grad, extra=()):
        log_p = vocab.log_softmax(teacher, temperature, out=work)
        log_q = vocab.log_softmax(student, temperature, out=grad)
        delta = torch.sub(log_p, log_q, out=grad)  # log P − log Q
        p = log_p.exp_()
        value = vocab.all_sum(row_sum_of_products(delta.mul_(p), p))
        if need_grad:
            vocab.softmax(student, temperature, out=grad).sub_(p)  # Q − P
        return value
