"""Exact per-token normalisation over a gradient-accumulation window and data-parallel ranks.

Each micro-batch back-propagates ``mean × tokens`` (a token sum). Before the optimizer step the
gradients are multiplied by ``accumulate × dp_size / tokens_in_window`` with the tokens counted
over every micro-batch of the window and every data-parallel rank. The data-parallel gradient
reduction averages over ``dp_size`` ranks and the window sums ``accumulate`` micro-batches, so
the result is exactly the gradient of the per-token mean over the whole window: batch b with
``accumulate_grad_batches=2`` equals batch 2b, and ranks with different numbers of valid tokens
are weighted correctly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_kd.parallel.mesh import dp_sum


class TokenWindow:
    """Counts valid tokens of one accumulation window and turns them into a gradient scale."""

    def __init__(self) -> None:
        self.tokens = 0

    def add(self, tokens: int) -> None:
        """Count the valid tokens of one micro-batch (this rank)."""
        self.tokens += int(tokens)

    def close(
        self, accumulate: int, group: dist.ProcessGroup | None, device: torch.device
    ) -> tuple[float, float]:
        """End the window: ``(scale, tokens in the window over all data-parallel ranks)``.

        Every data-parallel rank must call it (it all-reduces the count). The count restarts.

        Args:
            accumulate: micro-batches per optimizer step (``accumulate_grad_batches``).
            group: the data-parallel group (None for one process).
            device: where the all-reduce runs (the model's device).
        """
        window = float(dp_sum(torch.tensor([float(self.tokens)]), group, device)[0])
        dp_size = dist.get_world_size(group) if group is not None else 1
        self.tokens = 0
        return accumulate * dp_size / max(window, 1.0), window
