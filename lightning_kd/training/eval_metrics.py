"""Validation and test metrics of a distillation run: token sums over an epoch, reduced over the
data-parallel ranks at its end.

Per-token means are ``Σ value / Σ tokens`` over every batch of every data-parallel rank (not a
mean of batch means). The reduction is a collective, so every rank takes part, including a rank
that saw no batch (its sums are zeros): a rank that returned early would leave the others
waiting forever.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kd.parallel.mesh import dp_sum

#: The summed quantities, in order: the training objective, the divergence, the student's and
#: the teacher's cross-entropy on the labels, and the valid tokens.
FIELDS = ("loss", "kd_loss", "student_ce", "teacher_ce", "tokens")


class EvalSums:
    """Accumulates token sums of the evaluation metrics for one epoch."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(FIELDS), dtype=torch.float64)
        self.batches = 0
        self.teacher_known = True

    def add(
        self,
        loss: Tensor,
        kd_loss: Tensor,
        student_ce: Tensor,
        teacher_ce: Tensor | None,
        tokens: int,
    ) -> None:
        """Add one batch: per-token means ``loss`` and ``kd_loss``, cross-entropy *sums*
        ``student_ce`` and ``teacher_ce`` (None when the teacher's is unknown, e.g. from a
        top-k teacher cache: the teacher's metrics are then left out), and its number of
        valid tokens."""
        if teacher_ce is None:
            self.teacher_known = False
        values = [
            float(loss) * tokens,
            float(kd_loss) * tokens,
            float(student_ce),
            float(teacher_ce) if teacher_ce is not None else 0.0,
            float(tokens),
        ]
        self.sums += torch.tensor(values, dtype=torch.float64)
        self.batches += 1

    def compute(self, group: dist.ProcessGroup | None, device: torch.device) -> dict[str, float]:
        """Per-token means over the epoch and all data-parallel ranks, then reset.

        Every rank of ``group`` must call it, with or without batches.

        Returns:
            ``loss``, ``kd_loss``, ``student_ce``, ``teacher_ce``, ``student_ppl`` and
            ``teacher_ppl`` (perplexities capped at ``e^50``; the teacher's left out when a
            batch did not know it); empty when no rank saw a token.
        """
        # float64 on the wire: gloo and NCCL both reduce it, and sums of many tokens keep bits.
        total = dp_sum(self.sums, group, device).cpu().tolist()
        teacher_known = self.teacher_known
        self.__init__()
        sums = dict(zip(FIELDS, total, strict=True))
        tokens = sums.pop("tokens")
        if tokens <= 0:
            return {}
        means = {name: value / tokens for name, value in sums.items()}
        means["student_ppl"] = math.exp(min(means["student_ce"], 50.0))
        means["teacher_ppl"] = math.exp(min(means["teacher_ce"], 50.0))
        if not teacher_known:
            del means["teacher_ce"], means["teacher_ppl"]
        return means
