"""Statistics of the per-token divergence of one batch, reduced over the data-parallel ranks.

:class:`BatchStatistics` is the torchmetrics state (values, position buckets, top-k candidates
with their context) that ``PerTokenDivergenceMonitor`` fills with one micro-batch and reduces
over its data-parallel group; :func:`summary_metrics` turns the reduced state into the logged
scalars.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_kd.callbacks._common import local

__all__ = ["PREFIX", "QUANTILES", "BatchStatistics", "quantiles", "summary_metrics"]

#: Prefix of every logged metric key, the same for every divergence.
PREFIX = "div/"
#: The logged quantiles: (key suffix, quantile).
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

#: One top-k candidate: its value and ``[dp_rank, sample, position, target, *context_ids]``.
TopCandidate = tuple[float, list[int]]


class BatchStatistics(Metric):
    """The torchmetrics state of one summary: the valid per-token divergence values (cat),
    per-bucket sums and counts (sum), and every rank's top-k candidates with their context
    (cat).

    Args:
        position_buckets: number of equal position ranges of the sequence (>= 1).
        top_k: candidates kept per rank (and in the result).
        context_tokens: inputs recorded before (and at) each candidate's position.
        **kwargs: torchmetrics ``Metric`` options (process group, sync).
    """

    full_state_update = False

    def __init__(self, position_buckets: int, top_k: int, context_tokens: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.position_buckets = position_buckets
        self.top_k = top_k
        self.context_tokens = context_tokens
        zeros = torch.zeros(position_buckets, dtype=torch.float64)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("bucket_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("bucket_count", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("top_values", default=[], dist_reduce_fx="cat")
        self.add_state("top_info", default=[], dist_reduce_fx="cat")

    def update(
        self,
        per_token_div: Tensor,
        valid: Tensor,
        input_ids: Tensor | None,
        labels: Tensor | None,
        dp_rank: int,
    ) -> None:
        """Add one micro-batch.

        Args:
            per_token_div: ``[..., S]`` float per-token divergence (0 where ignored).
            valid: ``[..., S]`` bool, True where the label is not ignored.
            input_ids: ``[..., S]`` int inputs, or None.
            labels: ``[..., S]`` int targets, or None.
            dp_rank: this rank's data-parallel rank (recorded with its candidates).
        """
        seq = per_token_div.shape[-1]
        div = per_token_div.reshape(-1, seq).to(self.device, torch.float32)
        valid = valid.reshape(-1, seq).to(self.device)
        self.values.append(div[valid])

        # Bucket b holds the positions t with b·S/n ≤ t < (b+1)·S/n.
        bucket = torch.arange(seq, device=self.device) * self.position_buckets // seq
        masked = torch.where(valid, div, 0.0)
        self.bucket_sum.index_add_(0, bucket, masked.sum(0).double())
        self.bucket_count.index_add_(0, bucket, valid.sum(0).double())

        # Local top-k candidates; the global top-k is picked among all ranks' candidates.
        k = min(self.top_k, int(valid.sum()))
        flat = torch.where(valid, div, float("-inf")).flatten()
        top = flat.topk(k)
        rows, cols = top.indices // seq, top.indices % seq
        info = [torch.full_like(rows, dp_rank), rows, cols]
        info.append(self._take(labels, rows, cols[:, None]).squeeze(1))
        offsets = torch.arange(1 - self.context_tokens, 1, device=self.device)
        info.extend(self._take(input_ids, rows, cols[:, None] + offsets).unbind(1))
        self.top_values.append(top.values)
        self.top_info.append(torch.stack(info, dim=1))

    def _take(self, ids: Tensor | None, rows: Tensor, cols: Tensor) -> Tensor:
        """``ids[rows, cols]`` as int64, -1 where ``cols`` is out of range or ``ids`` absent."""
        if ids is None or ids.ndim < 1:
            return torch.full(cols.shape, -1, dtype=torch.int64, device=self.device)
        ids = local(ids).to(self.device).reshape(-1, ids.shape[-1])
        inside = cols >= 0
        taken = ids[rows[:, None], cols.clamp(min=0)].long()
        return torch.where(inside, taken, -1)

    def compute(self) -> dict[str, Tensor]:
        """The reduced state: ``values`` [N] float64, ``bucket_mean`` and ``bucket_count``
        [position_buckets] float64, ``top_values`` [<=top_k] and ``top_info``
        [<=top_k, 4 + context_tokens] int64, highest first."""
        values = dim_zero_cat(self.values).double()
        top_values, top_info = dim_zero_cat(self.top_values), dim_zero_cat(self.top_info)
        order = top_values.argsort(descending=True, stable=True)[: self.top_k]
        return {
            "values": values,
            "bucket_mean": self.bucket_sum / self.bucket_count,
            "bucket_count": self.bucket_count,
            "top_values": top_values[order],
            "top_info": top_info[order],
        }


def quantiles(values: Tensor, qs: Sequence[float]) -> Tensor:
    """Linear-interpolation quantiles like ``torch.quantile`` (no 2²⁴-element limit).

    Args:
        values: [N] float, N >= 1.
        qs: quantiles in [0, 1].

    Returns:
        [len(qs)] of ``values``' dtype.
    """
    ordered = values.sort().values
    pos = torch.tensor(qs, dtype=ordered.dtype, device=ordered.device) * (ordered.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_metrics(
    result: dict[str, Tensor], position_buckets: int
) -> tuple[dict[str, float], list[TopCandidate]] | None:
    """The logged scalars and the top candidates of a :meth:`BatchStatistics.compute` result.

    Returns:
        ``({"div/mean": ..., "div/p50": ..., "div/pos_00": ...}, top candidates)``; buckets
        without a valid token are left out. None when the batch had no valid token.
    """
    values = result["values"]
    if values.numel() == 0:
        return None
    scalars = torch.cat(
        [
            values.mean()[None],
            quantiles(values, [q for _, q in QUANTILES]),
            values.max()[None],
            torch.tensor([values.numel()], dtype=values.dtype, device=values.device),
            result["bucket_mean"].to(values.dtype),
        ]
    ).tolist()
    names = [f"{PREFIX}{name}" for name in ("mean", *(q for q, _ in QUANTILES), "max", "tokens")]
    metrics = dict(zip(names, scalars, strict=False))
    width = max(2, len(str(position_buckets - 1)))
    counts = result["bucket_count"].tolist()
    for b, (mean, count) in enumerate(zip(scalars[len(names) :], counts, strict=True)):
        if count > 0:
            metrics[f"{PREFIX}pos_{b:0{width}d}"] = mean
    top = list(zip(result["top_values"].tolist(), result["top_info"].tolist(), strict=True))
    return metrics, top
