"""How far a student is from its teacher on the student's *own* samples.

On-policy distillation trains on the student's samples because that is where the student is
used: its errors compound over the tokens it wrote itself, which held-out data never shows.
:func:`divergence_on_own_samples` measures exactly that: for held-out prompts (each row's tokens
up to its first supervised label, as :class:`~lightning_kd.training.on_policy.OnPolicySequences`
splits them) the student samples completions, and both models score them. Per completion token
it averages, in float64 over all rows:

- ``kl_to_teacher``: KL(p_teacher ‖ p_student), the forward KL (``evaluate``'s column);
- ``reverse_kl``: KL(p_student ‖ p_teacher), what the on-policy recipe minimises.

Both at temperature 1 over the ids both models know (``vocab_limit``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.outputs import logits_of
from lightning_kd.rollout import SamplingOptions, generate
from lightning_kd.training.on_policy import join_completions, split_prompts


@torch.no_grad()
def divergence_on_own_samples(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    options: SamplingOptions,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    vocab_limit: int | None = None,
    max_batches: int | None = None,
    ignore_index: int = -100,
) -> dict[str, Any]:
    """Sample completions from ``student`` for held-out prompts; score them with both models.

    Args:
        student, teacher: input_ids [B, S] int64 → logits [B, S, V] (V may differ: only the
            first ``vocab_limit`` ids are compared). Evaluated in ``eval()`` mode and left in it.
        batches: one conversation per row (not packed): ``input_ids`` and shifted ``labels``
            [B, S] int64, the prompt being the tokens up to the first supervised label.
        options: how the student samples (``temperature=0``: greedy).
        seed: the sampling generator's seed (the same for every student compared).
        eos_token_id: a completion ends after this token. None: ``max_new_tokens`` each.
        pad_token_id: fills prompts on the left and completions on the right.
        vocab_limit: the ids both models know; None: the smaller logits width.
        max_batches: use only the first batches; None: all.
        ignore_index: the label of unsupervised positions.

    Returns:
        ``{"tokens": int, "kl_to_teacher": float, "reverse_kl": float}`` (nats per sampled token).

    Raises:
        ValueError: for a row without a supervised label, packed rows, or no sampled token.
    """
    student.eval()
    teacher.eval()
    generator = torch.Generator().manual_seed(seed)
    tokens, forward, reverse = 0, 0.0, 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        prompt_ids, prompt_mask = split_prompts(batch, ignore_index, pad_token_id)
        rollout = generate(
            student, prompt_ids, prompt_mask, options, generator, eos_token_id, pad_token_id,
            vocab_limit=vocab_limit,
        )  # fmt: skip
        joined = join_completions(prompt_ids, prompt_mask, rollout, ignore_index, pad_token_id)
        s_logits = logits_of(student(joined["input_ids"]))
        t_logits = logits_of(teacher(joined["input_ids"]))
        width = min(s_logits.shape[-1], t_logits.shape[-1], vocab_limit or s_logits.shape[-1])
        mask = joined["labels"] != ignore_index
        s_log = F.log_softmax(s_logits[mask][:, :width].double(), dim=-1)
        t_log = F.log_softmax(t_logits[mask][:, :width].double(), dim=-1)
        forward += float((t_log.exp() * (t_log - s_log)).sum())
        reverse += float((s_log.exp() * (s_log - t_log)).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("divergence_on_own_samples: the student sampled no token to score.")
    return {"tokens": tokens, "kl_to_teacher": forward / tokens, "reverse_kl": reverse / tokens}


__all__ = ["divergence_on_own_samples"]
