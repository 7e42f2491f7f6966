"""Softmax over the vocabulary (last) dimension, written into caller-owned buffers.

The divergences in :mod:`lightning_kd.losses.divergences` never call ``torch.softmax``
directly: they ask a *vocabulary-softmax* object, so that the same per-chunk math runs on a full
vocabulary row (:class:`LocalVocabSoftmax`, fused PyTorch kernels) and on one rank's slice of a
vocabulary sharded across a tensor-parallel group (:mod:`lightning_kd.losses.vocab_parallel`),
where the normaliser needs collectives. Every method writes into ``out`` so that the chunked
engine controls exactly which buffers exist.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class VocabSoftmax(Protocol):
    """What a divergence needs from the vocabulary dimension (see ``vocab_softmax``)."""

    def log_softmax(self, x: Tensor, temperature: float, out: Tensor) -> Tensor: ...

    def softmax(self, x: Tensor, temperature: float, out: Tensor) -> Tensor: ...

    def all_sum(self, partial: Tensor) -> Tensor: ...

    def vocab_range(self, local_size: int, device: torch.device) -> tuple[int, int]: ...


class LocalVocabSoftmax:
    """Softmax, log-softmax and row sums when each row holds the whole vocabulary."""

    def load(self, x: Tensor, temperature: float, out: Tensor) -> Tensor:
        """Write ``x / temperature`` into ``out`` in ``out``'s dtype (cast before dividing)."""
        out.copy_(x)
        if temperature != 1.0:
            out.div_(temperature)
        return out

    def log_softmax(self, x: Tensor, temperature: float, out: Tensor) -> Tensor:
        """``out = log_softmax(x / temperature)`` over the last dim; ``x``, ``out``: [n, V]."""
        if temperature == 1.0 and x.dtype == out.dtype:
            return torch.log_softmax(x, -1, out=out)
        return torch.log_softmax(self.load(x, temperature, out), -1, out=out)

    def softmax(self, x: Tensor, temperature: float, out: Tensor) -> Tensor:
        """``out = softmax(x / temperature)`` over the last dim; ``x``, ``out``: [n, V]."""
        if temperature == 1.0 and x.dtype == out.dtype:
            return torch.softmax(x, -1, out=out)
        return torch.softmax(self.load(x, temperature, out), -1, out=out)

    def all_sum(self, partial: Tensor) -> Tensor:
        """Sum per-row partial results over vocabulary shards: a no-op for a full row."""
        return partial

    def vocab_range(self, local_size: int, device: torch.device) -> tuple[int, int]:
        """``(first vocabulary id of the local rows, whole vocabulary size)``: ``(0, V)``."""
        return 0, local_size
