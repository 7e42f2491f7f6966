"""``PerTokenDivergenceMonitor``: periodic statistics of the per-token divergence of the training
batches (the loss's chosen divergence, ``T²``-scaled: forward KL by default, or JSD, TVD, ...).

Reads the detached per-token divergence that :class:`~lightning_kd.DistillationModule` returns
from ``training_step`` (``per_token_div`` and ``valid_mask``, computed in the loss's own pass), so
it costs no second pass over the vocabulary. The statistics are reduced with torchmetrics over the
module's data-parallel group only: tensor-parallel ranks hold identical values and would
otherwise be counted several times.

The metric keys are ``div/...`` whatever the divergence (so that dashboards comparing runs with
different divergences line up); the divergence's label (e.g. ``JSD(β=0.5)``) is named in the
human-readable text instead.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from typing_extensions import override

from lightning_kd.callbacks._common import (
    PerTokenDivergenceCallback,
    data_parallel,
    divergence_label,
    local,
)
from lightning_kd.checks import check_int
from lightning_kd.training.lightning_private import logged_step

log = logging.getLogger(__name__)

#: Prefix of every logged metric key, the same for every divergence.
PREFIX = "div/"
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


class TopToken(NamedTuple):
    """One of the highest-divergence tokens of a summarised batch.

    Attributes:
        value: its per-token divergence (the loss's chosen divergence, ``T²``-scaled, as the
            loss computes it; ``kl`` in 0.1).
        position: its position ``t`` in the sequence (its target is ``labels[sample, t]``).
        sample: its row in the micro-batch of data-parallel rank ``dp_rank``.
        dp_rank: the data-parallel rank that held it.
        target_id: ``labels[sample, t]`` (-1 when the batch has no ``labels``).
        context_ids: the inputs ``input_ids[sample, t-c+1 .. t]`` the student saw last before
            predicting the target (empty when the batch has no ``input_ids``).
        text: ``'context' → 'target'`` decoded with the datamodule's tokenizer, or the ids.
    """

    value: float
    position: int
    sample: int
    dp_rank: int
    target_id: int
    context_ids: tuple[int, ...]
    text: str

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (checkpoints are loaded with ``weights_only=True``)."""
        out = self._asdict()
        out["context_ids"] = list(self.context_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TopToken:
        """The inverse of :meth:`to_dict`; also reads 0.1's dicts (``kl`` for ``value``)."""
        data = dict(data)
        if "value" not in data and "kl" in data:
            data["value"] = data.pop("kl")
        return cls(**{**data, "context_ids": tuple(data["context_ids"])})


class _BatchStatistics(Metric):
    """The torchmetrics state of one summary: the valid per-token divergence values (cat),
    per-bucket sums and counts (sum), and every rank's top-k candidates with their context
    (cat)."""

    full_state_update = False

    def __init__(self, position_buckets: int, top_k: int, context_tokens: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.position_buckets, self.top_k, self.context_tokens = (
            position_buckets,
            top_k,
            context_tokens,
        )
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


def _quantiles(values: Tensor, qs: Sequence[float]) -> Tensor:
    """Linear-interpolation quantiles like ``torch.quantile`` (no 2²⁴-element limit)."""
    ordered = values.sort().values
    pos = torch.tensor(qs, dtype=ordered.dtype, device=ordered.device) * (ordered.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _tokenizer(trainer: Trainer) -> Any | None:
    datamodule = getattr(trainer, "datamodule", None)
    tokenizer = getattr(datamodule, "tokenizer", None)
    return tokenizer if callable(getattr(tokenizer, "decode", None)) else None


class PerTokenDivergenceMonitor(PerTokenDivergenceCallback):
    """Log statistics of the per-token divergence (the loss's chosen divergence, ``T²``-scaled)
    every ``every_n_steps`` optimizer steps.

    After optimizer steps n, 2n, … it summarises the valid tokens of the micro-batch that
    completed the step, over all data-parallel ranks, and logs to every logger of the trainer
    (at Lightning's own step index for that batch, like ``LearningRateMonitor``):

    * ``div/mean``, ``div/p50``, ``div/p90``, ``div/p99``, ``div/max``: of the per-token
      divergence;
    * ``div/tokens``: how many valid tokens were summarised;
    * ``div/pos_00`` … : mean divergence per position bucket (positions ``0..S-1`` split into
      ``position_buckets`` equal ranges; bucket ``b`` holds ``b·S/n ≤ t < (b+1)·S/n``;
      buckets without a valid token are not logged);
    * the ``top_k`` tokens with the highest divergence, with the ``context_tokens`` inputs
      before them and their target, decoded by ``trainer.datamodule.tokenizer.decode`` when
      there is one: kept in :attr:`last_top_tokens`, logged at info level on rank 0, and sent
      as a Markdown table (``div/top_tokens``) to loggers whose ``experiment`` has ``add_text``
      (TensorBoard).

    The keys are the same whatever the divergence (0.1 logged ``kl/...``), so that runs with
    different divergences line up on one dashboard; the log line and the table name the
    divergence by its label (``pl_module.kd_loss.divergence.label``, e.g. ``JSD(β=0.5)``; see
    :func:`~lightning_kd.callbacks._common.divergence_label`).

    The per-token divergence comes from the ``training_step`` output (``per_token_div`` and
    ``valid_mask``, as :class:`~lightning_kd.DistillationModule` returns them; 0.1's
    ``per_token_kl`` is read when ``per_token_div`` is absent). Reductions use torchmetrics over
    ``pl_module.dp_group`` (the world group for modules without one), so tensor-parallel
    replicas are not counted twice. Every rank must reach the same steps (they do in
    Lightning's loop): the reduction is a collective.

    Args:
        every_n_steps: summarise after every n-th optimizer step (>= 1).
        top_k: how many highest-divergence tokens to report (>= 0; 0 reports none).
        position_buckets: number of position buckets (>= 1).
        context_tokens: inputs shown before each top token (>= 1; the last is the input at the
            token's own position).
        history_size: summaries kept in :attr:`history` and in checkpoints (>= 1).

    Raises:
        ValueError: for an argument outside its range or of the wrong type.
    """

    legacy_state_key = "PerTokenKLMonitor"

    def __init__(
        self,
        every_n_steps: int = 50,
        top_k: int = 5,
        position_buckets: int = 8,
        context_tokens: int = 4,
        history_size: int = 100,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.top_k = check_int("top_k", top_k, 0)
        self.position_buckets = check_int("position_buckets", position_buckets, 1)
        self.context_tokens = check_int("context_tokens", context_tokens, 1)
        self.history_size = check_int("history_size", history_size, 1)
        self.num_summaries = 0
        self.last_step = 0
        self.last_top_tokens: list[TopToken] = []
        self._history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self._metric: _BatchStatistics | None = None
        self._dp_rank = 0

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last ``history_size`` summaries, oldest first: ``{"step": global step,
        "metrics": {name: value}, "top_tokens": [TopToken.to_dict(), ...]}``."""
        return list(self._history)

    @property
    def last_metrics(self) -> dict[str, float]:
        """The scalars of the latest summary (empty before the first)."""
        return dict(self._history[-1]["metrics"]) if self._history else {}

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            # A new fit restarts the global step; a resume restores it in load_state_dict.
            self.last_step = 0

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._metric = None  # holds a process group: keep the callback picklable

    @override
    def _wants_batch(self, trainer: Trainer) -> bool:
        # The micro-batch that completed optimizer step n, 2n, ... (and only once per step).
        step = trainer.global_step
        return step != self.last_step and step % self.every_n_steps == 0

    @override
    def _record(
        self, trainer: Trainer, pl_module: LightningModule, div: Tensor, valid: Tensor, batch: Any
    ) -> None:
        step = trainer.global_step
        self.last_step = step
        summary = self._summarise(pl_module, div, valid, batch)
        if summary is None:
            return
        metrics, top = summary
        self.num_summaries += 1
        self.last_top_tokens = self._describe(trainer, top)
        self._history.append(
            {
                "step": step,
                "metrics": metrics,
                "top_tokens": [t.to_dict() for t in self.last_top_tokens],
            }
        )
        self._publish(trainer, step, metrics, divergence_label(pl_module))

    # ------------------------------------------------------------------ computation
    def _metric_for(self, pl_module: LightningModule) -> _BatchStatistics:
        if self._metric is None:
            dp = data_parallel(pl_module)
            self._dp_rank = dp.rank
            self._metric = _BatchStatistics(
                self.position_buckets,
                self.top_k,
                self.context_tokens,
                process_group=dp.group,
                sync_on_compute=dp.sync,
                distributed_available_fn=_available if dp.sync else _unavailable,
            ).to(pl_module.device)
        return self._metric

    def _summarise(
        self, pl_module: LightningModule, div: Tensor, valid: Tensor, batch: Any
    ) -> tuple[dict[str, float], list[tuple[float, list[int]]]] | None:
        metric = self._metric_for(pl_module)
        get = batch.get if isinstance(batch, Mapping) else (lambda key: None)
        metric.reset()
        metric.update(div, valid, get("input_ids"), get("labels"), self._dp_rank)
        result = metric.compute()
        metric.reset()
        values = result["values"]
        if values.numel() == 0:
            return None
        scalars = torch.cat(
            [
                values.mean()[None],
                _quantiles(values, [q for _, q in QUANTILES]),
                values.max()[None],
                torch.tensor([values.numel()], dtype=values.dtype, device=values.device),
                result["bucket_mean"].to(values.dtype),
            ]
        ).tolist()
        names = [
            f"{PREFIX}{name}" for name in ("mean", *(q for q, _ in QUANTILES), "max", "tokens")
        ]
        metrics = dict(zip(names, scalars, strict=False))
        width = max(2, len(str(self.position_buckets - 1)))
        counts = result["bucket_count"].tolist()
        for b, (mean, count) in enumerate(zip(scalars[len(names) :], counts, strict=True)):
            if count > 0:
                metrics[f"{PREFIX}pos_{b:0{width}d}"] = mean
        top = list(zip(result["top_values"].tolist(), result["top_info"].tolist(), strict=True))
        return metrics, top

    def _describe(self, trainer: Trainer, top: list[tuple[float, list[int]]]) -> list[TopToken]:
        tokenizer = _tokenizer(trainer)
        tokens = []
        for value, (dp_rank, sample, position, target, *context) in top:
            context_ids = tuple(i for i in context if i >= 0)
            tokens.append(
                TopToken(
                    value=value,
                    position=position,
                    sample=sample,
                    dp_rank=dp_rank,
                    target_id=target,
                    context_ids=context_ids,
                    text=_token_text(tokenizer, context_ids, target),
                )
            )
        return tokens

    # ------------------------------------------------------------------ output
    def _publish(self, trainer: Trainer, step: int, metrics: dict[str, float], label: str) -> None:
        if not trainer.is_global_zero:
            return
        # Lightning's own index for this batch, so the rows line up with the module's logs.
        log_step = logged_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step)
        if not self.last_top_tokens:
            return
        lines = [
            f"{i}. {label} {t.value:.4f} at position {t.position}: {t.text}"
            for i, t in enumerate(self.last_top_tokens, 1)
        ]
        log.info("Highest per-token %s at step %d:\n%s", label, step, "\n".join(lines))
        table = [f"| # | {_markdown(label)} | position | context → target |", "|---|---|---|---|"]
        table += [
            f"| {i} | {t.value:.4f} | {t.position} | {_markdown(t.text)} |"
            for i, t in enumerate(self.last_top_tokens, 1)
        ]
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text(f"{PREFIX}top_tokens", "\n".join(table), global_step=log_step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_summaries": self.num_summaries,
            "last_step": self.last_step,
            "history": [dict(entry) for entry in self._history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_summaries = int(state_dict["num_summaries"])
        self.last_step = int(state_dict["last_step"])
        history = (_upgraded(entry) for entry in state_dict["history"])
        self._history = deque(history, maxlen=self.history_size)
        self.last_top_tokens = (
            [TopToken.from_dict(t) for t in self._history[-1]["top_tokens"]]
            if self._history
            else []
        )


def _upgraded(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A history entry in this version's keys: 0.1 saved ``kl/...`` metrics and top tokens
    with ``kl`` for ``value`` (a resumed history reads the same as a fresh one)."""
    metrics = {
        f"{PREFIX}{name[3:]}" if name.startswith("kl/") else name: value
        for name, value in entry["metrics"].items()
    }
    top = [TopToken.from_dict(t).to_dict() for t in entry["top_tokens"]]
    return {**entry, "metrics": metrics, "top_tokens": top}


def _available() -> bool:
    return True


def _unavailable() -> bool:
    return False


def _token_text(tokenizer: Any | None, context: tuple[int, ...], target: int) -> str:
    if tokenizer is not None and target >= 0:
        try:
            return f"{tokenizer.decode(list(context))!r} → {tokenizer.decode([target])!r}"
        except Exception:  # a tokenizer that cannot decode these ids: fall back to the ids
            pass
    return f"{list(context)} → {target}"


def _markdown(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


#: 0.1 name, kept as an alias.
PerTokenKLMonitor = PerTokenDivergenceMonitor
#: 0.1 name, kept as an alias.
TopKLToken = TopToken
