"""Silence Lightning's "module(s) in eval mode" warning when those modules are frozen by design.

A distillation run keeps its teacher in eval mode with ``requires_grad=False``; Lightning
warns at the start of every fit that it "Found N module(s) in eval mode". That is expected,
and repeated on every run it trains users to ignore warnings. :class:`QuietFrozenModules`
silences exactly that warning, with exactly that N, and only when every module in eval mode
has no trainable parameter. Any other module left in eval mode (a student in eval mode by
mistake) still warns, as does every other warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.warnings import PossibleUserWarning

__all__ = ["QuietFrozenModules", "frozen_eval_modules"]


def frozen_eval_modules(module: LightningModule) -> int | None:
    """The number of modules of ``module`` in eval mode, when each of them is frozen (has no
    parameter with ``requires_grad``); None when one of them is trainable."""
    count = 0
    for _, sub in module.named_modules():
        if sub.training:
            continue
        if any(p.requires_grad for p in sub.parameters()):
            return None
        count += 1
    return count


class QuietFrozenModules(Callback):
    """Silences Lightning's eval-mode warning at the start of fit for frozen modules only.

    Lightning checks between ``on_fit_start`` and ``on_train_start``; the filter lives only
    there (``warnings.catch_warnings``), so nothing else is silenced.
    """

    def __init__(self) -> None:
        super().__init__()
        self._catcher: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        count = frozen_eval_modules(pl_module)
        if not count:
            return
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.filterwarnings(
            "ignore",
            message=rf"Found {count} module\(s\) in eval mode at the start of training",
            category=PossibleUserWarning,
        )

    def _restore(self) -> None:
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, error: BaseException):
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()
