"""The teacher's top-k log-probabilities per token, from whole or vocabulary-sharded logits.

Under tensor parallelism each rank holds a contiguous slice ``[N, V_local]`` of the logits.
The global top-k is among the union of the per-rank top-k candidates, so each rank sends its
``k`` best (value, id) pairs per token (an all-gather of ``O(N · k)``) and the global
log-normaliser comes from two ``O(N)`` all-reduces (row maxima, shifted exp-sums), as in
:class:`~lightning_kd.losses.vocab_parallel.VocabParallelSoftmax`. The vocabulary is never
gathered. Every rank of the group must call with the same rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax


def exact_logprobs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` in float32 over the last dimension, [N, V] -> [N, V]."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def topk_logprobs(
    logits: Tensor, k: int, temperature: float, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` most likely tokens per row and their log-probabilities at temperature T.

    Args:
        logits: [N, V] (or, with ``group``, this rank's [N, V_local] slice; slices are
            contiguous and in rank order), any float dtype.
        k: entries per row, 1 <= k <= V.
        temperature: T > 0; the log-probabilities are ``log_softmax(logits / T)``.
        group: the tensor-parallel group over which the vocabulary is sharded, or None.

    Returns:
        ``(ids [N, k] int64, logprobs [N, k] float32)``, by decreasing probability.

    Raises:
        ValueError: when ``k`` is out of range.
    """
    ids, logprobs, _ = topk_with_tail(logits, k, temperature, group)
    return ids, logprobs


def topk_with_tail(
    logits: Tensor, k: int, temperature: float, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`topk_logprobs` and the log of the mass outside the top-k, from the logits.

    The tail's log-mass is a log-sum-exp over the other entries (never ``1 − Σ P_i``), so a
    tail of 1e-30 is stored as such; ``−inf`` when k = V. Under tensor parallelism it costs two
    more ``O(N)`` all-reduces.

    Returns:
        ``(ids [N, k] int64, logprobs [N, k] float32, tail_logprob [N] float32)``.

    Raises:
        ValueError: when ``k`` is out of range.
    """
    z = logits.float() / temperature
    if group is None or dist.get_world_size(group) == 1:
        if not 1 <= k <= z.shape[-1]:
            raise ValueError(f"top_k must be in [1, {z.shape[-1]}] (the vocabulary), got {k}.")
        log_probs = torch.log_softmax(z, dim=-1)
        values, ids = log_probs.topk(k, dim=-1)
        rest = log_probs.scatter_(-1, ids, float("-inf"))
        return ids, values, torch.logsumexp(rest, dim=-1)
    softmax = VocabParallelSoftmax(group)
    first, vocab = softmax.vocab_range(z.shape[-1], z.device)
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}] (the vocabulary), got {k}.")
    # Log-probabilities over the whole vocabulary from the local shard (global normaliser).
    log_probs = softmax.log_softmax(z, 1.0, out=torch.empty_like(z))
    local = min(k, z.shape[-1])
    values = torch.full((z.shape[0], k), float("-inf"), device=z.device)
    ids = torch.full((z.shape[0], k), -1, dtype=torch.int64, device=z.device)
    top_values, top_ids = log_probs.topk(local, dim=-1)
    values[:, :local], ids[:, :local] = top_values, top_ids + first
    size = dist.get_world_size(group)
    all_values = [torch.empty_like(values) for _ in range(size)]
    all_ids = [torch.empty_like(ids) for _ in range(size)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    best, where = torch.cat(all_values, dim=-1).topk(k, dim=-1)
    best_ids = torch.cat(all_ids, dim=-1).gather(-1, where)
    # The tail: this shard's entries outside the global top-k, log-sum-exp'ed over the group.
    owned = (best_ids >= first) & (best_ids < first + z.shape[-1])
    columns = torch.where(owned, best_ids - first, 0)
    hits = torch.zeros(log_probs.shape, dtype=torch.int32, device=z.device)
    hits.scatter_add_(-1, columns, owned.to(torch.int32))  # unowned ids add 0 to column 0
    rest = log_probs.masked_fill_(hits > 0, float("-inf"))
    row_max = rest.amax(-1, keepdim=True)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    row_max.masked_fill_(torch.isinf(row_max), 0.0)
    total = rest.sub_(row_max).exp_().sum(-1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return best_ids, best, total.log() + row_max.squeeze(-1)
