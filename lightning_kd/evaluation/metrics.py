"""Per-token evaluation metrics of a model against the labels and a teacher.

All are means over the valid tokens (labels != ``ignore_index``) of every batch seen, summed in
float64 (a mean of sums, not of batch means):

- ``ce``: cross-entropy of the labels (nats/token); ``perplexity = exp(ce)``.
- ``accuracy``: the model's top-1 token equals the label.
- ``kl_to_teacher``: KL(p_teacher ‖ p_model) at temperature 1 (nats/token): how far the model's
  next-token distribution is from the teacher's — the quantity distillation minimises.
- ``top1_agreement``: the model's top-1 token equals the teacher's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class TokenMetrics:
    """Accumulates the sums of one model's metrics over batches."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ce = 0.0
        self.correct = 0
        self.kl = 0.0
        self.agree = 0
        self.with_teacher = False

    @torch.no_grad()
    def add(
        self,
        logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | None = None,
        ignore_index: int = -100,
    ) -> None:
        """Add one batch.

        Args:
            logits: [B, S, V] the model's logits (any float dtype; computed in fp32).
            labels: [B, S] int64 next-token labels, ``ignore_index`` where not a target.
            teacher_logits: [B, S, V'] the teacher's, or None. When V' != V, the first
                min(V, V') columns of both are compared (padded heads).
            ignore_index: the label of positions that are not targets.

        Raises:
            ValueError: shapes that do not line up.
        """
        if logits.shape[:2] != labels.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}."
            )
        if teacher_logits is not None and teacher_logits.shape[:2] != labels.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match labels "
                f"{tuple(labels.shape)}."
            )
        valid = labels != ignore_index
        n = int(valid.sum())
        if n == 0:
            return
        for row in range(labels.shape[0]):  # one row at a time: [S, V] fp32 copies only
            keep = valid[row]
            if not keep.any():
                continue
            student = logits[row][keep].float()
            target = labels[row][keep]
            self.ce += float(F.cross_entropy(student, target, reduction="sum"))
            self.correct += int((student.argmax(-1) == target).sum())
            if teacher_logits is not None:
                width = min(student.shape[-1], teacher_logits.shape[-1])
                teacher = teacher_logits[row][keep].float()[:, :width]
                log_q = F.log_softmax(student[:, :width], dim=-1)
                log_p = F.log_softmax(teacher, dim=-1)
                self.kl += float((log_p.exp() * (log_p - log_q)).sum())
                self.agree += int((student[:, :width].argmax(-1) == teacher.argmax(-1)).sum())
        self.tokens += n
        self.with_teacher = self.with_teacher or teacher_logits is not None

    def compute(self) -> dict[str, float | int | None]:
        """The means: ``tokens``, ``ce``, ``perplexity``, ``accuracy``, ``kl_to_teacher`` and
        ``top1_agreement`` (the last two None without a teacher)."""
        if self.tokens == 0:
            raise ValueError("no valid tokens were evaluated (every label was ignore_index).")
        ce = self.ce / self.tokens
        return {
            "tokens": self.tokens,
            "ce": ce,
            "perplexity": math.exp(min(ce, 700.0)),
            "accuracy": self.correct / self.tokens,
            "kl_to_teacher": self.kl / self.tokens if self.with_teacher else None,
            "top1_agreement": self.agree / self.tokens if self.with_teacher else None,
        }
