"""Batched generation from left-padded prompts with a KV cache, under no-grad."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from lightning_kd.lightning_private import fsdp_claim_root
from lightning_kd.rollout.decoders import decoder_for
from lightning_kd.rollout.sampling import SamplingOptions, sample_tokens


class Rollout(NamedTuple):
    """Completions of a batch of prompts.

    Attributes:
        tokens: [B, N] int64 generated tokens (N <= max_new_tokens); ``pad_token_id`` after a
            row's EOS.
        mask: [B, N] bool, True on generated tokens up to and including the row's EOS.
    """

    tokens: Tensor
    mask: Tensor


@contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of ``model`` unsharded for the duration (one all-gather per unit, not
    one per token), resharded after. Units that a decoder runs through their own forward keep
    their parameters gathered meanwhile (``set_reshard_after_forward(False)``, set back to
    True, how :func:`~lightning_kd.parallel.fsdp.apply_fsdp` shards the blocks). No effect on a
    model without FSDP2."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first
    if not units:
        yield
        return
    # FSDP2 picks its root at the first forward: make it the model's root before a hooked
    # decoder runs the units' forwards (a unit run first would claim the root).
    fsdp_claim_root(units[0])
    for unit in units[1:]:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in units[1:]:
            unit.set_reshard_after_forward(True, recurse=False)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    options: SamplingOptions,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    vocab_limit: int | None = None,
    lockstep: bool = False,
) -> Rollout:
    """Complete each prompt with the model's current weights.

    Args:
        model: a ``TinyLlama`` or ``HFCausalLM`` (plain, TP-sharded, FSDP2-sharded or both).
        prompt_ids: [B, P] int64 prompts, left-padded (every row's last token is real).
        prompt_mask: [B, P] bool, False on the left padding.
        options: max_new_tokens, temperature (0: greedy), top-k, top-p.
        generator: random source on the model's device (unused when greedy). Ranks that pass
            equally seeded generators and see the same logits (TP ranks of one replica) draw
            the same tokens.
        eos_token_id: a row stops after this token (later positions: ``pad_token_id``,
            masked). None: every row runs ``max_new_tokens``.
        pad_token_id: the token written after a row's EOS.
        vocab_limit: sample only among the first ``vocab_limit`` ids (a padded lm_head's extra
            rows are never drawn).
        lockstep: with a decoder that runs the model's hooked forward (HFCausalLM), run all
            ``max_new_tokens`` steps even when every row has stopped, so that data-parallel
            ranks call FSDP2's hooks equally often (a safety net: with the parameters gathered
            they issue no collective).

    Returns:
        The :class:`Rollout`.

    Raises:
        ValueError: for mismatched prompt shapes, a prompt row without a real last token, or
            a model the in-process generator does not support.
    """
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [B, P], got {tuple(prompt_ids.shape)} "
            f"and {tuple(prompt_mask.shape)}."
        )
    prompt_mask = prompt_mask.bool()
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: every row's last token must be real.")
    bsz, n_prompt = prompt_ids.shape
    decoder = decoder_for(model, n_prompt + options.max_new_tokens)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    key_mask = prompt_mask
    finished = torch.zeros(bsz, dtype=torch.bool, device=prompt_ids.device)
    tokens: list[Tensor] = []
    alive: list[Tensor] = []
    with gathered_parameters(model):
        logits = decoder.step(prompt_ids, positions, key_mask)
        for step in range(options.max_new_tokens):
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]
            token = sample_tokens(logits, options, generator)
            token = token.masked_fill(finished, pad_token_id)
            alive.append(~finished)
            tokens.append(token)
            if eos_token_id is not None:
                finished = finished | (token == eos_token_id)
            last = step == options.max_new_tokens - 1
            if last or (bool(finished.all()) and not (lockstep and decoder.hooked)):
                break
            positions = positions[:, -1:] + 1
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
            logits = decoder.step(token[:, None], positions, key_mask)
    return Rollout(torch.stack(tokens, dim=1), torch.stack(alive, dim=1))


__all__ = ["Rollout", "gathered_parameters", "generate"]
