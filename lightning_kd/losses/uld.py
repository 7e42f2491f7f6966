"""The chunk math of the cross-tokenizer losses: span-merged probabilities and ULD.

Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs") compares two distributions over *different*
vocabularies by their sorted probability vectors: with ``p↓`` and ``q↓`` the teacher's and the
student's probabilities in decreasing order, the shorter one padded with zeros to the larger
vocabulary, the per-position loss is the closed-form Wasserstein-1 distance
``Σ_i |p↓_i − q↓_i|`` (TRL's ``ULDLoss``: ``l1_loss(student_sorted, teacher_sorted, "sum")``).

A span of several tokens on one side is merged into one vector first (TRL GOLD's chained
probabilities): ``P̃(v) = P_first(v) · Π_{r > first} P_r(y_r)``, the first row's distribution
times the probability of each later token of the span given the ones before, the *actual*
tokens ``y_r``. The entry of the span's first token is the probability of the span's token
sequence (chain rule); the others are the first-row distribution scaled by the same factor, so
the merged vector keeps the first row's order and its sort is the first row's sort, scaled.

Everything here is plain autograd on one chunk of rows; the engine
(:mod:`lightning_kd.losses.cross_tokenizer_engine`) takes its gradient chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chained_log_factor(
    chain_rows: Tensor, targets: Tensor, owner: Tensor, num_spans: int, temperature: float
) -> Tensor:
    """``Σ_{r in span, r > first} log softmax(x_r / T)[y_r]`` per span, [num_spans].

    Args:
        chain_rows: [M, V] logits of every span row after the first (compute dtype).
        targets: [M] the token each of those rows predicts.
        owner: [M] the span (0..num_spans-1) of each row.
        num_spans: number of spans.
        temperature: softmax temperature.
    """
    out = torch.zeros(num_spans, dtype=chain_rows.dtype, device=chain_rows.device)
    if chain_rows.shape[0] == 0:
        return out
    log_probs = torch.log_softmax(chain_rows / temperature, dim=-1)
    picked = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return out.index_add(0, owner, picked)


def sorted_l1(
    student_first: Tensor,
    student_log_factor: Tensor,
    teacher_first: Tensor,
    teacher_log_factor: Tensor,
    temperature: float,
) -> Tensor:
    """ULD per span: ``Σ_i |sort↓(P̃)_i − sort↓(Q̃)_i|`` of the merged vectors, [K].

    Args:
        student_first: [K, V_s] logits of each span's first student row.
        student_log_factor: [K] log of the chained factor of the student's later rows.
        teacher_first: [K, V_t] logits of each span's first teacher row.
        teacher_log_factor: [K] the teacher's.
        temperature: softmax temperature of both sides.
    """
    q = torch.softmax(student_first / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = torch.softmax(teacher_first / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = q * student_log_factor.exp().unsqueeze(1)
    p = p * teacher_log_factor.exp().unsqueeze(1)
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)
