"""Progress of the whole run: a bar (terminal) or plain lines (redirected logs).

Lightning's default bars count the batches of one epoch, so a run bounded by ``max_steps``
shows a wrong total and a wrong time estimate; and tqdm writes escape sequences into a log
file. The CLI uses :func:`run_progress_bar` unless the config names a progress bar:

- :class:`RunProgressBar` on a terminal: tqdm, one bar over the run's training batches
  (:func:`run_total_batches`), with the run's remaining time.
- :class:`PlainProgress` otherwise: a line every ``every_n_batches`` batches, e.g.
  ``train 150/1500 (10%) | 2.1 batch/s | elapsed 0:01:11 | remaining 0:10:42 | loss=2.31``.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

__all__ = ["PlainProgress", "RunProgressBar", "run_progress_bar", "run_total_batches"]

#: Lines :class:`PlainProgress` prints over a bounded run by default.
PLAIN_LINES_PER_RUN = 20
#: Its interval in batches when the run's length is unknown.
PLAIN_UNBOUNDED_EVERY = 50


def run_total_batches(trainer: Trainer) -> int | None:
    """The training batches of the whole run, or None when no finite bound is known.

    ``max_steps`` optimizer steps take ``accumulate_grad_batches`` batches each, except at the
    end of an epoch, where Lightning steps on what has accumulated; ``max_epochs`` epochs are
    ``max_epochs × num_training_batches``. The smaller bound wins.
    """
    per_epoch, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
    bounds = []
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        if math.isfinite(per_epoch) and per_epoch > 0:
            steps_per_epoch = math.ceil(per_epoch / accumulate)
            epochs, steps = divmod(trainer.max_steps, steps_per_epoch)
            bounds.append(epochs * int(per_epoch) + min(steps * accumulate, int(per_epoch)))
        else:
            bounds.append(trainer.max_steps * accumulate)
    if trainer.max_epochs not in (None, -1) and math.isfinite(per_epoch):
        bounds.append(int(trainer.max_epochs) * int(per_epoch))
    return min(bounds) if bounds else None


def _batches_done(trainer: Trainer) -> int:
    """Training batches run so far, over every epoch (restored on resume)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


class RunProgressBar(TQDMProgressBar):
    """A tqdm bar whose total is the run's length (see :func:`run_total_batches`), not one
    epoch's: on a run bounded by ``max_steps`` its count and remaining time are the run's.

    Takes :class:`~lightning.pytorch.callbacks.TQDMProgressBar`'s arguments.
    """

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        total = run_total_batches(trainer)
        if total is None:  # unbounded: Lightning's per-epoch bar
            super().on_train_epoch_start(trainer, *args)
            return
        bar = self.train_progress_bar
        if bar.total != total:  # the first epoch of this fit: one bar for the whole run
            done = _batches_done(trainer)
            bar.reset(total=total)
            bar.initial = bar.n = done  # the rate (and remaining time) counts this fit only
        bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if run_total_batches(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
            return
        bar, done = self.train_progress_bar, _batches_done(trainer)
        due = done == bar.total or done % max(self.refresh_rate, 1) == 0 if bar else False
        if bar is not None and not bar.disable and due:
            bar.n = done
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class PlainProgress(ProgressBar):
    """Training progress as plain lines on stdout, for logs that are not a terminal.

    Args:
        every_n_batches: print a line every this many training batches (and at the last).
            None: about 20 lines over a bounded run, every 50 batches over an unbounded one.

    Raises:
        ValueError: ``every_n_batches`` < 1.
    """

    def __init__(self, every_n_batches: int | None = None) -> None:
        super().__init__()
        if every_n_batches is not None and every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1 or None, got {every_n_batches}.")
        self.every_n_batches = every_n_batches
        self._enabled = True
        self._start = 0.0
        self._start_batches = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        if self._enabled:
            print(*args, sep=sep, **kwargs)

    def _interval(self, total: int | None) -> int:
        if self.every_n_batches is not None:
            return self.every_n_batches
        if total is None:
            return PLAIN_UNBOUNDED_EVERY
        return max(1, total // PLAIN_LINES_PER_RUN)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._start_batches = time.monotonic(), _batches_done(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        total, done = run_total_batches(trainer), _batches_done(trainer)
        if not self._enabled or (done % self._interval(total) and done != total):
            return
        elapsed = time.monotonic() - self._start
        rate = (done - self._start_batches) / elapsed if elapsed > 0 else 0.0
        parts = [f"train {done}/{total} ({100 * done / total:.0f}%)" if total else
                 f"train {done}", f"{rate:.2f} batch/s", f"elapsed {_clock(elapsed)}"]  # fmt: skip
        if total and rate > 0:
            parts.append(f"remaining {_clock((total - done) / rate)}")
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if metrics:
            parts.append(" ".join(f"{key}={_fmt(value)}" for key, value in metrics.items()))
        print(" | ".join(parts), flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            text = " ".join(f"{key}={_fmt(value)}" for key, value in sorted(metrics.items()))
            print(f"validation at batch {_batches_done(trainer)} | {text}", flush=True)


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def run_progress_bar(stream: Any = None) -> ProgressBar:
    """:class:`RunProgressBar` when ``stream`` (default: stdout) is a terminal, else
    :class:`PlainProgress`."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return RunProgressBar() if callable(isatty) and isatty() else PlainProgress()
