"""Lightning callbacks: the per-token divergence monitors, a checkpoint when a run stops, and
an export of the student to Hugging Face format when ``fit`` ends.

The per-token callbacks work for every divergence of :class:`~lightning_kd.KDLoss`: their
metric keys are ``div/...`` whatever the divergence, and their text and plots name it by its
label (e.g. ``JSD(β=0.5)``). ``PerTokenKLMonitor``, ``KLPlot``, ``KLSample`` and ``TopKLToken``
are the 0.1 names, kept as aliases (so configs with
``class_path: lightning_kd.callbacks.PerTokenKLMonitor`` still work), as are the 0.1 module
paths ``lightning_kd.callbacks.per_token_kl`` and ``lightning_kd.callbacks.kl_plot`` (with a
DeprecationWarning, see ``lightning_kd.MOVED_MODULES``).
"""

from lightning_kd.callbacks.checkpoint_on_stop import CheckpointOnStop, Stopped
from lightning_kd.callbacks.divergence_plot import (
    DivergencePlot,
    DivergenceSample,
    KLPlot,  # 0.1 name, kept as an alias
    KLSample,  # 0.1 name, kept as an alias
)
from lightning_kd.callbacks.export_on_fit_end import ExportOnFitEnd
from lightning_kd.callbacks.per_token_divergence import (
    PerTokenDivergenceMonitor,
    PerTokenKLMonitor,  # 0.1 name, kept as an alias
    TopKLToken,  # 0.1 name, kept as an alias
    TopToken,
)

__all__ = [
    "CheckpointOnStop",
    "DivergencePlot",
    "DivergenceSample",
    "ExportOnFitEnd",
    "KLPlot",
    "KLSample",
    "PerTokenDivergenceMonitor",
    "PerTokenKLMonitor",
    "Stopped",
    "TopKLToken",
    "TopToken",
]
