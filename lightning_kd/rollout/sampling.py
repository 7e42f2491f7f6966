"""Sampling options and drawing the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_kd.checks import check_int


@dataclass(frozen=True)
class SamplingOptions:
    """How completions are drawn (checked when made).

    Attributes:
        max_new_tokens: most tokens generated per prompt (>= 1).
        temperature: softmax temperature of sampling; 0 is greedy (argmax).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches
            ``top_p`` (1.0 keeps all).
        top_k: keep the ``top_k`` most likely tokens (0 keeps all).

    Raises:
        ValueError: for ``max_new_tokens < 1``, a negative or non-finite temperature,
            ``top_p`` outside (0, 1] or a negative ``top_k``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("top_k (0 = all)", self.top_k, 0)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}.")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}.")

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (``temperature == 0``)."""
        return self.temperature == 0


def sample_tokens(
    logits: Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> Tensor:
    """The next token of each row.

    Args:
        logits: [B, V] float logits of the next token.
        options: temperature / top-k / top-p.
        generator: the random source (on ``logits.device``); unused when greedy.

    Returns:
        [B] int64 token ids.
    """
    if options.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / options.temperature
    if 0 < options.top_k < scores.shape[-1]:
        kth = scores.topk(options.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - ordered.softmax(dim=-1)) >= options.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["SamplingOptions", "sample_tokens"]
