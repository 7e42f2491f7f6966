"""TRL's ULD loss (``trl/experimental/gold/gold_trainer.py``, ``ULDLoss`` with
``use_extended_uld=True`` and ``uld_use_hybrid_loss=False``), reduced to the pieces that decide
the value, as a reference for :class:`lightning_kd.losses.ULDLoss`. TRL is not a dependency.
Copied from TRL (Apache License 2.0, Copyright The HuggingFace Team); only the trainer plumbing
(answer-region slicing, EOS skipping, CE term) is left out.

One sequence: ``student_logits`` [S, V_s] and ``teacher_logits`` [T, V_t] are the rows of the
completion, ``*_token_ids`` the tokens they predict, ``*_offsets`` each token's (start, end)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def align_by_byte_offsets(s_offsets, t_offsets):
    s_groups, t_groups = [], []
    s_start = t_start = s = t = 0
    n_s, n_t = len(s_offsets), len(t_offsets)
    while s < n_s and t < n_t:
        s_end, t_end = s_offsets[s][1], t_offsets[t][1]
        if s_end < t_end:
            s += 1
        elif s_end > t_end:
            t += 1
        else:
            s += 1
            t += 1
            s_groups.append(list(range(s_start, s)))
            t_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < n_s or t < n_t:
        s_groups.append(list(range(s_start, n_s)))
        t_groups.append(list(range(t_start, n_t)))
    return s_groups, t_groups


def merge_probabilities_with_alignment_groups(probs, alignment_groups, token_ids):
    vocab_size = probs.size(-1)
    aligned_probs = torch.zeros(
        len(alignment_groups), vocab_size, device=probs.device, dtype=probs.dtype
    )
    eps = 1e-8
    for group_idx, group in enumerate(alignment_groups):
        if len(group) > 1:
            marginal_probs = probs[group[0]]
            conditional_prob_product = 1.0
            for idx in group[1:]:
                token_prob = probs[idx, token_ids[idx]].clamp_min(eps)
                conditional_prob_product *= token_prob
            aligned_probs[group_idx] = marginal_probs * conditional_prob_product
        elif len(group) == 1:
            aligned_probs[group_idx] = probs[group[0]]
    return aligned_probs


def trl_uld_loss(
    student_logits, teacher_logits, student_token_ids, teacher_token_ids,
    student_offsets, teacher_offsets, temperature=1.0,
):  # fmt: skip
    student_probs = F.softmax(student_logits / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits / temperature, dim=-1)
    student_groups, teacher_groups = align_by_byte_offsets(student_offsets, teacher_offsets)
    paired = [(sg, tg) for sg, tg in zip(student_groups, teacher_groups) if sg and tg]  # noqa: B905
    student_groups = [sg for sg, _ in paired]
    teacher_groups = [tg for _, tg in paired]
    student_aligned = merge_probabilities_with_alignment_groups(
        student_probs, student_groups, student_token_ids
    )
    teacher_aligned = merge_probabilities_with_alignment_groups(
        teacher_probs, teacher_groups, teacher_token_ids
    )
    student_sorted = student_aligned.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_aligned.sort(dim=-1, descending=True).values
    max_vocab_size = max(student_sorted.size(-1), teacher_sorted.size(-1))
    student_sorted = F.pad(student_sorted, (0, max_vocab_size - student_sorted.size(-1)))
    teacher_sorted = F.pad(teacher_sorted, (0, max_vocab_size - teacher_sorted.size(-1)))
    aligned_loss = F.l1_loss(student_sorted, teacher_sorted, reduction="sum")
    return aligned_loss / student_aligned.size(0), student_groups, teacher_groups
