"""Sampling text from a causal language model: the plain reference sampler.

:func:`sample` extends a batch of prompts one token at a time, re-running the model over the
whole (windowed) sequence at each step: no KV cache, so it works for any model that maps
``input_ids [B, S]`` to logits ``[B, S, V]`` (a :class:`~lightning_kd.TinyLlama`, an
:class:`~lightning_kd.models.hf.HFCausalLM`, a plain ``transformers`` model). It is the
reference a faster (KV-cache, batched) sampler is tested against and can replace: keep the
signature. :func:`next_token_probs` is the temperature / top-k / top-p filtering, on its own.

``lightning-kd generate`` uses it for checkpoints; an exported Hugging Face directory uses
``transformers``' own ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_kd.models.outputs import logits_of

__all__ = ["next_token_probs", "sample"]


def _check_options(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}.")


def next_token_probs(
    logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
) -> Tensor:
    """The distribution to draw the next token from, after temperature, top-k and top-p.

    Args:
        logits: ``[B, V]`` logits of the next token (any float dtype).
        temperature: divides the logits; ``0`` puts all mass on the argmax (greedy).
        top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p``
            (nucleus sampling; ``1.0``: off). The most likely token is always kept.
        top_k: keep the ``top_k`` most likely tokens (``0``: off).

    Returns:
        ``[B, V]`` float32 probabilities, each row summing to 1.

    Raises:
        ValueError: a negative temperature or top_k, or a top_p outside (0, 1].
    """
    _check_options(temperature, top_p, top_k)
    logits = logits.float()
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = mass_before >= top_p  # never drops the first (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    max_context: int | None = None,
) -> Tensor:
    """Extend each prompt of ``input_ids`` by up to ``max_new_tokens`` sampled tokens.

    A row stops at its first end token (which is kept); rows that stopped are filled with the
    (first) end token while the others go on, and sampling ends when every row stopped.

    Args:
        model: maps ``input_ids [B, S]`` (int64) to logits ``[B, S, V]`` (a tensor or an
            output with ``logits``); called in eval mode, without gradients.
        input_ids: ``[B, S]`` int64 prompts, ``S >= 1``, all of the same length.
        max_new_tokens: the most tokens to add (>= 0).
        temperature: see :func:`next_token_probs` (``0``: greedy).
        top_p: see :func:`next_token_probs`.
        top_k: see :func:`next_token_probs`.
        eos_token_id: the token (or tokens) that end a row (None: every row runs to
            ``max_new_tokens``).
        generator: the random generator to draw with (on the logits' device); a seeded one
            makes the samples reproducible.
        max_context: the model's longest input; longer sequences are cut to their last
            ``max_context`` tokens before each forward (None: no limit).

    Returns:
        ``[B, S + n]`` int64: the prompts and their continuations, ``n <= max_new_tokens``.

    Raises:
        ValueError: ``input_ids`` not ``[B, S]`` integers with ``S >= 1``, a negative
            ``max_new_tokens``, ``max_context < 1``, or bad sampling options.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be [B, S] integer token ids with S >= 1, got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}."
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if max_context is not None and max_context < 1:
        raise ValueError(f"max_context must be >= 1 or None, got {max_context}.")
    _check_options(temperature, top_p, top_k)
    ends = None
    if eos_token_id is not None:
        ends = [eos_token_id] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
        ends = torch.tensor(ends or [-1], dtype=torch.long, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        tokens = input_ids.long()
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            window = tokens if max_context is None else tokens[:, -max_context:]
            logits = logits_of(model(window))[:, -1, :]
            probs = next_token_probs(logits, temperature, top_p, top_k)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            token = token.to(tokens.device)
            if ends is not None:
                token = token.masked_fill(done, int(ends[0]))
                done |= torch.isin(token, ends)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if ends is not None and bool(done.all()):
                break
        return tokens
    finally:
        model.train(was_training)
