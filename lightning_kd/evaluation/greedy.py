"""Greedy continuations for evaluation samples: one prompt as a list of ids, through the
reference sampler of ``lightning-kd generate`` (:func:`lightning_kd.generation.sample` at
temperature 0; no KV cache, plenty for a few dozen tokens from small models)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_kd.generation import sample


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    max_context: int | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """The greedy continuation of ``prompt_ids`` (new tokens only).

    Args:
        model: maps input_ids [1, S] int64 to logits [1, S, V] (or an object with them).
        prompt_ids: the prompt's token ids (at least one).
        max_new_tokens: the most tokens to add (>= 0).
        max_context: keep only the last ``max_context`` tokens as input (a model's longest
            sequence); None: the whole sequence.
        eos_id: stop after generating this token (it is included).

    Raises:
        ValueError: an empty prompt, a negative ``max_new_tokens`` or ``max_context < 1``.
    """
    if not prompt_ids:
        raise ValueError("greedy_generate needs a non-empty prompt.")
    if max_new_tokens < 0 or (max_context is not None and max_context < 1):
        raise ValueError(
            f"max_new_tokens must be >= 0 and max_context >= 1, got {max_new_tokens} and "
            f"{max_context}."
        )
    device = next(model.parameters()).device
    prompt = torch.tensor([prompt_ids], device=device)
    out = sample(model, prompt, max_new_tokens, temperature=0.0, eos_token_id=eos_id,
                 max_context=max_context)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()
