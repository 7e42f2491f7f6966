"""Lightning callbacks: the per-token divergence monitors, a checkpoint when a run stops, an
export of the student to Hugging Face format when ``fit`` ends, progress over the whole run
(a bar, or plain lines for logs) and the frozen teacher's eval-mode warning silenced.

The per-token callbacks work for every divergence of :class:`~lightning_kd.KDLoss`: their
metric keys are ``div/...`` whatever the divergence, and their text and plots name it by its
label (e.g. ``JSD(β=0.5)``). ``PerTokenKLMonitor``, ``KLPlot``, ``KLSample`` and ``TopKLToken``
are the 0.1 names, kept as aliases with a DeprecationWarning (so configs with
``class_path: lightning_kd.callbacks.PerTokenKLMonitor`` still work), as are the 0.1 module
paths ``lightning_kd.callbacks.per_token_kl`` and ``lightning_kd.callbacks.kl_plot``; see
:mod:`lightning_kd.compat` for the release that removes them.
"""

from typing import Any

from lightning_kd.callbacks.checkpoint_on_stop import CheckpointOnStop, Stopped
from lightning_kd.callbacks.divergence_plot import (
    DivergencePlot,
    DivergenceSample,
)
from lightning_kd.callbacks.export_on_fit_end import ExportOnFitEnd
from lightning_kd.callbacks.frozen_modules import QuietFrozenModules
from lightning_kd.callbacks.per_token_divergence import (
    PerTokenDivergenceMonitor,
    TopToken,
)
from lightning_kd.callbacks.run_progress import PlainProgress, RunProgressBar
from lightning_kd.compat import renamed_attribute

__all__ = [
    "CheckpointOnStop",
    "DivergencePlot",
    "DivergenceSample",
    "ExportOnFitEnd",
    "PerTokenDivergenceMonitor",
    "PlainProgress",
    "QuietFrozenModules",
    "RunProgressBar",
    "Stopped",
    "TopToken",
]


def __getattr__(name: str) -> Any:
    return renamed_attribute(__name__, name)
