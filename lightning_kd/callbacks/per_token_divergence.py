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

This module is the callback (when to summarise, its history and checkpointed state, where the
results go); the statistics are :mod:`~lightning_kd.callbacks.divergence_stats` and the top
tokens' records and text :mod:`~lightning_kd.callbacks.top_tokens`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_kd.callbacks._common import (
    PerTokenDivergenceCallback,
    data_parallel,
    divergence_label,
)
from lightning_kd.callbacks.divergence_stats import PREFIX, BatchStatistics, summary_metrics
from lightning_kd.callbacks.top_tokens import (
    TopToken,
    describe_top_tokens,
    top_token_lines,
    top_token_table,
)
from lightning_kd.checks import check_int
from lightning_kd.compat import renamed_attribute
from lightning_kd.lightning_private import logged_step

__all__ = ["PREFIX", "PerTokenDivergenceMonitor", "TopToken"]

log = logging.getLogger(__name__)


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
    divergence by its label (``pl_module.loss.divergence.label``, e.g. ``JSD(β=0.5)``; see
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
        self._metric: BatchStatistics | None = None
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
    def _metric_for(self, pl_module: LightningModule) -> BatchStatistics:
        if self._metric is None:
            dp = data_parallel(pl_module)
            self._dp_rank = dp.rank
            self._metric = BatchStatistics(
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
        return summary_metrics(result, self.position_buckets)

    def _describe(self, trainer: Trainer, top: list[tuple[float, list[int]]]) -> list[TopToken]:
        return describe_top_tokens(_tokenizer(trainer), top)

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
        lines = top_token_lines(label, self.last_top_tokens)
        log.info("Highest per-token %s at step %d:\n%s", label, step, "\n".join(lines))
        table = top_token_table(label, self.last_top_tokens)
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text(f"{PREFIX}top_tokens", table, global_step=log_step)

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


def __getattr__(name: str) -> Any:  # 0.1 names, see lightning_kd.compat
    return renamed_attribute(__name__, name)
